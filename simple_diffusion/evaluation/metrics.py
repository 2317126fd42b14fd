"""Sample-quality metrics from features: names, reference statistics, scores.

Metric names say which network made the features. Only InceptionV3 features
(the standard FID network) give `fid`, `kid` and `inception_score`; the
always-available EfficientNet-Lite0 features give `fd_effnet_lite0` and
`kid_effnet_lite0`, which are not comparable with published FIDs.
"""

import dataclasses
import os
import zipfile

import numpy as np
import scipy.special

from simple_diffusion.evaluation import frechet

FEATURE_NAMES = ("effnet_lite0", "inception_v3")


class StatsFileError(ValueError):
    """A reference-statistics file cannot be read; the message names it and the fix."""


@dataclasses.dataclass(frozen=True)
class FeatureStats:
    """Reference statistics of a dataset's features.

    Attributes:
      mu: float64 [D] feature mean.
      sigma: float64 [D, D] unbiased feature covariance.
      features: optional float32 [M, D] random subset of the features, kept
        so that KID (which needs samples, not moments) can be computed
        against cached statistics.
    """

    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray | None = None


def compute_stats(features: np.ndarray, *, keep_for_kid: int = 10_000,
                  seed: int = 0) -> FeatureStats:
    """Statistics of `features` ([N, D]) plus up to `keep_for_kid` samples."""
    mu, sigma = frechet.feature_statistics(features)
    kept = None
    if keep_for_kid > 0:
        features = np.asarray(features)
        if len(features) > keep_for_kid:
            rng = np.random.default_rng(seed)
            features = features[np.sort(rng.choice(len(features), keep_for_kid,
                                                   replace=False))]
        kept = features.astype(np.float32)
    return FeatureStats(mu, sigma, kept)


def save_stats(path: str, mu: np.ndarray, sigma: np.ndarray, *,
               features: np.ndarray | None = None) -> None:
    """Writes reference statistics to `path` (`.npz`: `mu`, `sigma`[, `features`])."""
    arrays = {"mu": np.asarray(mu, np.float64),
              "sigma": np.asarray(sigma, np.float64)}
    if features is not None:
        arrays["features"] = np.asarray(features, np.float32)
    # Written next to the target and renamed: a run killed mid-write leaves no
    # truncated cache for the next run to trip over.
    tmp_path = f"{path}.tmp-{os.getpid()}"
    with open(tmp_path, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp_path, path)


def load_stats(path: str) -> FeatureStats:
    """Reads statistics written by `save_stats` (or pytorch-fid's `.npz`).

    Raises:
      StatsFileError: the file is not a readable `.npz` with `mu` and `sigma`
        (truncated, not a zip, wrong arrays); the message names the file and
        says to delete it, so that the evaluator recomputes it.
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            features = data["features"] if "features" in data.files else None
            return FeatureStats(data["mu"].astype(np.float64),
                                data["sigma"].astype(np.float64), features)
    except FileNotFoundError:
        raise
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        # np.load raises ValueError/OSError for a file that is not .npy/.npz
        # (e.g. text), BadZipFile or EOFError for a truncated one, KeyError for
        # an .npz without the arrays; none of them names the file.
        reason = f"{type(e).__name__}: {e}".splitlines()[0]
        raise StatsFileError(
            f"Cannot read reference statistics {path} ({reason}). It is not an .npz with "
            "'mu' and 'sigma' arrays written by save_stats or pytorch-fid, or it is damaged. "
            "Delete it (the evaluator recomputes and caches the statistics on its next run) "
            "or point to a good copy.") from None


def inception_score(logits: np.ndarray, *, num_splits: int = 10
                    ) -> tuple[float, float]:
    """Inception Score exp(E_x KL(p(y|x) || p(y))) (Salimans et al., 2016).

    As in the reference code, the N samples are cut into `num_splits`
    consecutive splits, the score is computed per split with p(y) the split's
    mean prediction, and the mean and std over splits are returned.

    Args:
      logits: [N, K] classifier logits (K = 1008 for the FID InceptionV3; the
        softmax runs over all K as the original TF graph's does).
      num_splits: number of splits, each with >= 1 sample.

    Returns:
      `(mean, std)` as Python floats; the score lies in [1, K].
    """
    log_p = scipy.special.log_softmax(np.asarray(logits, np.float64), axis=1)
    if len(log_p) < num_splits:
        raise ValueError(f"{len(log_p)} samples for {num_splits} splits")
    n = len(log_p)
    scores = []
    for i in range(num_splits):
        part = log_p[i * n // num_splits:(i + 1) * n // num_splits]
        log_marginal = np.log(np.exp(part).mean(axis=0))
        kl = (np.exp(part) * (part - log_marginal)).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


def metric_names(feature_name: str) -> dict[str, str]:
    """Keys `compute_metrics` uses: {"fd": ..., "kid": ...} for `feature_name`."""
    if feature_name == "inception_v3":
        return {"fd": "fid", "kid": "kid"}
    if feature_name == "effnet_lite0":
        return {"fd": "fd_effnet_lite0", "kid": "kid_effnet_lite0"}
    raise ValueError(f"unknown feature_name {feature_name!r}; "
                     f"expected one of {FEATURE_NAMES}")


def compute_metrics(gen_features: np.ndarray,
                    ref_features_or_stats: np.ndarray | FeatureStats, *,
                    feature_name: str, gen_logits: np.ndarray | None = None,
                    kid_subsets: int = 100, kid_subset_size: int = 1000
                    ) -> dict[str, float]:
    """Fréchet distance, KID and (InceptionV3 only) Inception Score.

    Args:
      gen_features: [N, D] features of generated samples.
      ref_features_or_stats: [M, D] reference features, or cached
        `FeatureStats` (KID is then reported only if they kept features).
      feature_name: "effnet_lite0" or "inception_v3"; sets the metric names.
      gen_logits: [N, 1008] InceptionV3 logits of the generated samples, for
        the Inception Score; only allowed with "inception_v3".
      kid_subsets, kid_subset_size: see `frechet.kernel_distance`.

    Returns:
      e.g. `{"fd_effnet_lite0": ..., "kid_effnet_lite0": ...,
      "kid_effnet_lite0_std": ...}` or `{"fid": ..., "kid": ..., "kid_std":
      ..., "inception_score": ..., "inception_score_std": ...}`.
    """
    names = metric_names(feature_name)
    if isinstance(ref_features_or_stats, FeatureStats):
        ref = ref_features_or_stats
    else:
        ref = compute_stats(ref_features_or_stats, keep_for_kid=0)
        ref = dataclasses.replace(ref, features=ref_features_or_stats)
    mu, sigma = frechet.feature_statistics(gen_features)
    results = {names["fd"]: frechet.frechet_distance(mu, sigma, ref.mu, ref.sigma)}
    if ref.features is not None:
        kid, kid_std = frechet.kernel_distance(
            gen_features, ref.features, num_subsets=kid_subsets,
            subset_size=kid_subset_size)
        results[names["kid"]] = kid
        results[names["kid"] + "_std"] = kid_std
    if gen_logits is not None:
        if feature_name != "inception_v3":
            raise ValueError("the Inception Score needs InceptionV3 logits")
        score, score_std = inception_score(gen_logits)
        results["inception_score"] = score
        results["inception_score_std"] = score_std
    return results
