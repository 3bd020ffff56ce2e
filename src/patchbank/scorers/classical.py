"""Image-level detectors on globally pooled features, via scikit-learn. No maps.

All return higher = more anomalous (sklearn's ``decision_function`` / ``score_samples`` are
"higher = more normal", so they are negated).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from sklearn.cluster import KMeans
from sklearn.covariance import EllipticEnvelope, LedoitWolf
from sklearn.decomposition import PCA
from sklearn.ensemble import IsolationForest
from sklearn.neighbors import LocalOutlierFactor
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import OneClassSVM

from patchbank.scorers.base import Params, PooledScorer

log = logging.getLogger(__name__)


def make_pca(pca: int | float | None, n_samples: int, n_features: int,
             seed: int = 0) -> PCA | None:
    """PCA keeping ``pca`` components (int, clipped to the data) or that fraction of variance
    (float in (0, 1)); None or 0 -> no PCA."""
    if pca is None or pca == 0:
        return None
    if isinstance(pca, float) and pca < 1:
        return PCA(n_components=pca, svd_solver="full", random_state=seed)
    n = min(int(pca), n_samples, n_features)
    return PCA(n_components=n, random_state=seed)


class MahalanobisScorer(PooledScorer):
    """Rippel et al. 2020: Mahalanobis distance of pooled features to a Gaussian fitted with
    Ledoit-Wolf shrinkage, after optional PCA (int components or float variance fraction)."""

    name: ClassVar[str] = "mahalanobis"
    min_train: ClassVar[int] = 2

    @dataclass(frozen=True)
    class Params(Params):
        pca: int | float | None = None

        def check(self) -> None:
            pca = self.pca
            if isinstance(pca, float) and pca >= 1 and pca.is_integer():
                object.__setattr__(self, "pca", int(pca))  # 10.0 -> 10 components
            self.require(self.pca is None or (isinstance(self.pca, int) and self.pca >= 0)
                         or (isinstance(self.pca, float) and 0 < self.pca < 1), "pca",
                         "None, an int >= 0 or a variance fraction in (0, 1)")

    def _fit_pooled(self, z: np.ndarray) -> None:
        self._pca = make_pca(self.p.pca, *z.shape)
        if self._pca is not None:
            z = self._pca.fit_transform(z)
            log.info("mahalanobis: PCA to %d dims", self._pca.n_components_)
        self._lw = LedoitWolf().fit(z)

    def _score_pooled(self, z: np.ndarray) -> np.ndarray:
        if self._pca is not None:
            z = self._pca.transform(z)
        return np.sqrt(np.maximum(self._lw.mahalanobis(z), 0.0))


class OCSVMScorer(PooledScorer):
    """One-class SVM (RBF kernel, gamma="scale") on standardised pooled features."""

    name: ClassVar[str] = "ocsvm"

    @dataclass(frozen=True)
    class Params(Params):
        nu: float = 0.1

        def check(self) -> None:
            self.require(0 < self.nu <= 1, "nu", "in (0, 1]")

    def _fit_pooled(self, z: np.ndarray) -> None:
        self._model: Pipeline = make_pipeline(
            StandardScaler(), OneClassSVM(nu=self.p.nu, gamma="scale")).fit(z)

    def _score_pooled(self, z: np.ndarray) -> np.ndarray:
        return -self._model.decision_function(z)


class IForestScorer(PooledScorer):
    """Isolation forest (seeded) on pooled features."""

    name: ClassVar[str] = "iforest"

    @dataclass(frozen=True)
    class Params(Params):
        n_estimators: int = 200
        seed: int = 0

        def check(self) -> None:
            self.require(self.n_estimators >= 1, "n_estimators", ">= 1")

    def _fit_pooled(self, z: np.ndarray) -> None:
        self._model = IsolationForest(n_estimators=self.p.n_estimators,
                                      random_state=self.p.seed).fit(z)

    def _score_pooled(self, z: np.ndarray) -> np.ndarray:
        return -self._model.score_samples(z)


class LOFScorer(PooledScorer):
    """Local outlier factor (novelty mode) on pooled features; n_neighbors clipped to N - 1."""

    name: ClassVar[str] = "lof"
    min_train: ClassVar[int] = 2

    @dataclass(frozen=True)
    class Params(Params):
        n_neighbors: int = 20

        def check(self) -> None:
            self.require(self.n_neighbors >= 1, "n_neighbors", ">= 1")

    def _fit_pooled(self, z: np.ndarray) -> None:
        k = min(self.p.n_neighbors, len(z) - 1)
        self._model = LocalOutlierFactor(n_neighbors=k, novelty=True).fit(z)

    def _score_pooled(self, z: np.ndarray) -> np.ndarray:
        return -self._model.score_samples(z)


class EllipticScorer(PooledScorer):
    """Robust (minimum covariance determinant) Gaussian, seeded, after PCA to ``pca`` dims
    (clipped to (N - 1) // 2 so the fit is well-posed with few images; 0 = no PCA).
    Score = squared robust Mahalanobis distance."""

    name: ClassVar[str] = "elliptic"
    min_train: ClassVar[int] = 3

    @dataclass(frozen=True)
    class Params(Params):
        pca: int = 8
        seed: int = 0

        def check(self) -> None:
            self.require(self.pca >= 0, "pca", ">= 0")

    def _fit_pooled(self, z: np.ndarray) -> None:
        pca = self.p.pca
        if pca:
            pca = max(1, min(pca, (len(z) - 1) // 2))
        self._pca = make_pca(pca, *z.shape, seed=self.p.seed)
        if self._pca is not None:
            z = self._pca.fit_transform(z)
        self._model = EllipticEnvelope(random_state=self.p.seed).fit(z)

    def _score_pooled(self, z: np.ndarray) -> np.ndarray:
        if self._pca is not None:
            z = self._pca.transform(z)
        return -self._model.score_samples(z)


class KMeansScorer(PooledScorer):
    """k-means (seeded) on pooled features; score = distance to the nearest centroid."""

    name: ClassVar[str] = "kmeans"

    @dataclass(frozen=True)
    class Params(Params):
        n_clusters: int = 8
        seed: int = 0

        def check(self) -> None:
            self.require(self.n_clusters >= 1, "n_clusters", ">= 1")

    def _fit_pooled(self, z: np.ndarray) -> None:
        k = min(self.p.n_clusters, len(z))
        self._model = KMeans(n_clusters=k, n_init=10, random_state=self.p.seed).fit(z)

    def _score_pooled(self, z: np.ndarray) -> np.ndarray:
        return self._model.transform(z).min(axis=1)
