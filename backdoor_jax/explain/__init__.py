"""Explanations: Grad-CAM family, saliency, VisualBackProp, stimulation, metrics, overlays.

``faithfulness`` holds the faithfulness and sanity metrics (deletion / insertion, ROAD,
region perturbation, parameter randomisation, random logit). ``layers`` is the one layer API (forward-order layer info, the default-layer rule,
name resolution); ``registry`` holds the explanation methods by name. Importing this
package registers the built-in methods (the imports below, in registry order).
"""
from backdoor_jax.explain import registry
from backdoor_jax.explain.layers import LayerInfo, choose_layer, default_layer, layer_info, resolve_layers
from backdoor_jax.explain.core import activations_and_gradients
from backdoor_jax.explain.gradcam import CamResult, cam_from, gradcam, gradcam_maps, normalize_maps, upsample
from backdoor_jax.explain.methods import FeatureMapCams, feature_map_cams, gradcam_pp, simple_grad
from backdoor_jax.explain.stimulation import stimulate
from backdoor_jax.explain.vbp import visual_backprop
from backdoor_jax.explain.metrics import correct_rate, energy_in_region, fooling_success_rate, iou, iou_summary
from backdoor_jax.explain.metrics import pointing_game, region_from_trigger, square_region
from backdoor_jax.explain.overlay import grid_figure  # not `overlay`: that name stays the module
from backdoor_jax.explain.registry import Method, explanation_maps
from backdoor_jax.explain.faithfulness import Curve, aopc, deletion, insertion, region_perturbation, road
from backdoor_jax.explain.imputation import linear_impute, noisy_linear_impute
from backdoor_jax.explain.sanity import SanityResult, random_logit_test, randomization_test, similarities
