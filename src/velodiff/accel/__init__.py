"""Network-level accelerators and instruments: they hook diffusers modules through diffusers' own APIs
(attention processors, ``diffusers.hooks.HookRegistry``), never by replacing ``forward`` methods, and
read the step index from the evaluation request.

    attention_maps, (PAG's identity attention)   attention.py
    feature_change                               hooks.py
    deepcache                                    deepcache.py   (DeepCache, Ma et al. 2024: UNets)
    fbcache, taylorseer                          block_cache.py (diffusers' cache hooks: DiTs)
    (deepcache's schedule=budget)                cache_schedule.py, calibration.py (velodiff calibrate cache)
    int8, int4, fp8                              quantize.py    (torchao)
    w4a8                                         w4a8.py        (DGQ-style, velodiff's own)
    tome                                         tome.py        (ToMe for SD, Bolya & Hoffman 2023)
    compile                                      compile.py     (torch.compile)
"""
