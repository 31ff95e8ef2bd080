"""The guidance family: rules on the step plan (``velodiff.plan``) that choose which conditioning
branches to evaluate and combine their predictions, each reporting the passes it really ran.

    cfg        classifier-free guidance, with a t-interval        (guidance/cfg.py)
    rescale    guidance rescale                                    (guidance/cfg.py)
    ag         Adaptive Guidance                                   (guidance/adaptive.py)
    linear_ag  LinearAG                                            (guidance/adaptive.py)
    apg        Adaptive Projected Guidance                         (guidance/apg.py)
    cfgpp      CFG++                                               (guidance/cfgpp.py)
    cfg_zero   CFG-Zero*                                           (guidance/cfg_zero.py)
    pag        Perturbed-Attention Guidance                        (guidance/pag.py)
    compose    composable multi-prompt guidance                    (guidance/compose.py)
    classifier off-the-shelf classifier guidance on x0 (EluCD)       (guidance/classifier.py)
    reward     reward steering of the state through x0 (FlowChef)  (guidance/reward.py)
    sld        Safe Latent Diffusion: steer away from a concept    (guidance/sld.py)
    recur      universal guidance's self-recurrence                (guidance/recurrence.py)

Rules that combine cond and uncond claim the ``uncond`` branch (one per plan); PAG and compose add
terms on top; rescale acts after them, classifier guidance last; reward steering moves the state
after each step.
"""

from .adaptive import AdaptiveGuidance, LinearAG
from .apg import AdaptiveProjectedGuidance
from .cfg import ClassifierFreeGuidance, GuidanceRescale, GuidedCond
from .cfg_zero import CFGZeroStar
from .cfgpp import CFGPlusPlus
from .classifier import ClassifierGuidance
from .compose import ComposableGuidance, split_prompt
from .pag import PerturbedAttentionGuidance
from .recurrence import SelfRecurrence
from .reward import RewardSteering
from .sld import SafeLatentDiffusion

__all__ = [
    "AdaptiveGuidance",
    "AdaptiveProjectedGuidance",
    "CFGPlusPlus",
    "CFGZeroStar",
    "ClassifierGuidance",
    "ClassifierFreeGuidance",
    "ComposableGuidance",
    "GuidanceRescale",
    "GuidedCond",
    "LinearAG",
    "PerturbedAttentionGuidance",
    "RewardSteering",
    "SafeLatentDiffusion",
    "SelfRecurrence",
    "split_prompt",
]
