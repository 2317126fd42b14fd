"""Sample-quality evaluation: feature extractors and metrics.

Modules:
  features: `get_feature_extractor("effnet_lite0" | "inception_v3")`.
  metrics: `compute_metrics`, reference-statistics caching, Inception Score.
  frechet: Fréchet distance and KID on features (float64 NumPy).
  efficientnet_lite0, inception_v3: the Flax networks.
  torch_pickle: reads `torch.save` files without torch.
  convert_inception_weights: CLI, pytorch-fid `.pth` -> `.npz`.
"""

from simple_diffusion.evaluation.features import get_feature_extractor
from simple_diffusion.evaluation.metrics import compute_metrics
from simple_diffusion.evaluation.metrics import compute_stats
from simple_diffusion.evaluation.metrics import FeatureStats
from simple_diffusion.evaluation.metrics import inception_score
from simple_diffusion.evaluation.metrics import load_stats
from simple_diffusion.evaluation.metrics import save_stats
