"""Explanations: Grad-CAM family, saliency, VisualBackProp, stimulation, metrics, overlays."""
from backdoor_jax.explain.core import activations_and_gradients, layer_shapes, resolve_layers
from backdoor_jax.explain.gradcam import CamResult, cam_from, gradcam, gradcam_maps, normalize_maps, upsample
from backdoor_jax.explain.methods import FeatureMapCams, feature_map_cams, forward_layers, gradcam_pp, simple_grad
from backdoor_jax.explain.stimulation import stimulate
from backdoor_jax.explain.vbp import visual_backprop
from backdoor_jax.explain.metrics import correct_rate, energy_in_region, fooling_success_rate, iou, iou_summary
from backdoor_jax.explain.metrics import pointing_game, region_from_trigger, square_region
from backdoor_jax.explain.overlay import grid_figure  # not `overlay`: that name stays the module
