"""Network-level accelerators and instruments: they hook diffusers modules through diffusers' own APIs
(attention processors, ``diffusers.hooks.HookRegistry``), never by replacing ``forward`` methods, and
read the step index from the evaluation request.

    attention_maps, (PAG's identity attention)   attention.py
    feature_change                               hooks.py
    deepcache                                    deepcache.py   (DeepCache, Ma et al. 2024: UNets)
"""
