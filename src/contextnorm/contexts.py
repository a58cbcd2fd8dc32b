"""Context assignments: which context each sample belongs to, for the context-based normalizations.

The context kinds of :data:`CONTEXTS` follow the papers' sources of contexts: k-means clusters
of the inputs, the components of a Gaussian mixture fitted by EM, superclasses (and the classes
themselves, for generation), and visual domains; ``random`` is the ablation that keeps the
number and sizes of the groups and drops their information. A builder is fitted on the
training split only and then assigns contexts to any split; ``KMeansContexts`` and
``GMMContexts`` look at the images alone, never at labels.

Superclass and class contexts are a function of the label, so a model given them at test time
has been told (part of) the answer. ``label_derived`` flags such kinds, and
``ContextPredictor`` infers a label-derived context from the image alone for the honest second
number.

A kind of your own: a class with the :class:`ContextBuilder` interface, registered with
``@CONTEXTS.register("name")``; its constructor may take ``num_contexts`` and ``seed`` (passed
when it accepts them) and any options (``contexts.options`` in a config).
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.mixture import GaussianMixture
from sklearn.pipeline import Pipeline, make_pipeline

from contextnorm.data import ImageData
from contextnorm.registry import Registry

_PREDICT_CHUNK = 8192

CIFAR10_VEHICLES_ANIMALS: dict[int, int] = {
    0: 0,  # airplane
    1: 0,  # automobile
    2: 1,  # bird
    3: 1,  # cat
    4: 1,  # deer
    5: 1,  # dog
    6: 1,  # frog
    7: 1,  # horse
    8: 0,  # ship
    9: 0,  # truck
}
"""CIFAR-10 split into two superclasses: vehicles (0) and animals (1), by CIFAR-10 label id."""

SUPERCLASS_MAPPINGS: dict[str, dict[int, int]] = {
    "cifar10-vehicles-animals": CIFAR10_VEHICLES_ANIMALS
}
"""Named fine-label -> superclass mappings, so that configuration files can name them."""

Features = Literal["pixels", "pca"]


@runtime_checkable
class ContextBuilder(Protocol):
    """Fitted on a training split, then gives each sample of any split a context id in [0, K).

    Attributes:
        num_contexts: K, known after ``fit``.
        label_derived: whether the contexts are computed from the labels (class attribute).
        title: a short name of what a test sample's context is (a table heading).
        description: one sentence on where a test sample's context comes from.
    """

    num_contexts: int
    label_derived: ClassVar[bool]
    title: ClassVar[str]
    description: ClassVar[str]

    def fit(self, train: ImageData) -> ContextBuilder:
        """Learn whatever the assignment needs from the training split; returns ``self``."""
        ...

    def assign(self, data: ImageData) -> torch.Tensor:
        """int64 tensor (N,) of context ids in ``[0, num_contexts)``."""
        ...


CONTEXTS: Registry[type[ContextBuilder]] = Registry("context kind")
"""Context kinds by name (``contexts.kind`` in a config); each entry is a builder class."""


def label_derived(kind: str) -> bool:
    """Whether contexts of this kind are computed from the labels.

    Evaluation of such contexts must also report accuracy with contexts inferred from the
    input alone (see ``ContextPredictor``), since the oracle context leaks the label.
    """
    return CONTEXTS.get(kind).label_derived


def build_contexts(
    kind: str, num_contexts: int | None, train: ImageData, *, seed: int = 0, **options: Any
) -> ContextBuilder:
    """Create the builder for ``kind`` and fit it on ``train``.

    Args:
        kind: a registered context kind: "kmeans", "gmm", "superclass", "domain", "random".
        num_contexts: K for "kmeans" and "gmm" (required) and "random"; for "superclass" and
            "domain" it is given by the data or the mapping, and a value here must agree with it.
        train: the training split.
        seed: random seed of the fit (clustering and random kinds).
        **options: keyword arguments of the builder class (e.g. ``features="pca"`` for k-means,
            ``mapping=CIFAR10_VEHICLES_ANIMALS`` for superclasses, ``like="gmm"`` for random).

    Returns:
        The fitted builder: call ``assign`` on any split.
    """
    builder_class = CONTEXTS.get(kind)
    accepted = inspect.signature(builder_class).parameters
    arguments = dict(options)
    if "num_contexts" in accepted:
        arguments["num_contexts"] = num_contexts
    if "seed" in accepted:
        arguments["seed"] = seed
    builder = builder_class(**arguments)
    builder.fit(train)
    if num_contexts is not None and num_contexts != builder.num_contexts:
        raise ValueError(
            f"num_contexts={num_contexts} but this data set has {builder.num_contexts} {kind!r} "
            "contexts; leave num_contexts unset or give the matching value."
        )
    return builder


def _check_not_empty(data: ImageData, argument: str) -> None:
    if len(data) == 0:
        raise ValueError(f"{argument} is empty; contexts need at least one sample.")


def _pixel_features(images: torch.Tensor) -> np.ndarray:
    """uint8 images as float32 rows scaled to [0, 1], the input space of the clustering papers."""
    return images.reshape(len(images), -1).numpy().astype(np.float32) / 255.0


def _fit_indices(num_samples: int, max_fit_samples: int, seed: int) -> torch.Tensor:
    """All sample positions, or a seeded sorted subsample of ``max_fit_samples`` of them."""
    if max_fit_samples < 1:
        raise ValueError(f"max_fit_samples must be at least 1; got {max_fit_samples}.")
    if num_samples <= max_fit_samples:
        return torch.arange(num_samples)
    chosen = np.random.default_rng(seed).choice(num_samples, size=max_fit_samples, replace=False)
    return torch.from_numpy(np.sort(chosen))


def _pca(components: int, fit_rows: np.ndarray, seed: int, *, whiten: bool = False) -> PCA:
    if components < 1:
        raise ValueError(f"pca_components must be at least 1; got {components}.")
    return PCA(n_components=min(components, *fit_rows.shape), whiten=whiten, random_state=seed)


def _predict(
    model: BaseEstimator, data: ImageData, fitted_shape: tuple[int, ...], method: str
) -> np.ndarray:
    """Apply ``model.<method>`` to the images in chunks, bounding the float copy of a split."""
    if tuple(data.images.shape[1:]) != fitted_shape:
        raise ValueError(
            f"images of shape {tuple(data.images.shape[1:])} differ from the {fitted_shape} seen "
            "in fit; load both splits with the same image_size."
        )
    predict = getattr(model, method)
    return np.concatenate(
        [predict(_pixel_features(chunk)) for chunk in data.images.split(_PREDICT_CHUNK)]
    )


class _ClusterContexts(ABC):
    """What the unsupervised builders share: optional PCA, subsampled fit, chunked assignment."""

    label_derived: ClassVar[bool] = False

    def __init__(
        self,
        num_contexts: int | None,
        *,
        seed: int = 0,
        features: Features = "pixels",
        pca_components: int = 50,
        max_fit_samples: int = 20000,
    ) -> None:
        if num_contexts is None:
            raise ValueError(
                "num_contexts is required for clustered contexts; give the number of clusters K "
                "(contexts.num_contexts in a config)."
            )
        if isinstance(num_contexts, bool) or not isinstance(num_contexts, int) or num_contexts < 1:
            raise ValueError(f"num_contexts must be an int >= 1; got {num_contexts!r}.")
        if features not in ("pixels", "pca"):
            raise ValueError(f"features must be 'pixels' or 'pca'; got {features!r}.")
        self.num_contexts = num_contexts
        self.seed = seed
        self.features = features
        self.pca_components = pca_components
        self.max_fit_samples = max_fit_samples
        self._model: Pipeline | None = None
        self._image_shape: tuple[int, ...] = ()

    @abstractmethod
    def _cluster_model(self) -> BaseEstimator:
        """The unfitted scikit-learn clusterer with ``num_contexts`` clusters."""

    def fit(self, train: ImageData) -> _ClusterContexts:
        """Cluster (a seeded subsample of at most ``max_fit_samples`` of) the training images."""
        _check_not_empty(train, "train")
        rows = _pixel_features(
            train.images[_fit_indices(len(train), self.max_fit_samples, self.seed)]
        )
        if self.num_contexts > len(rows):
            raise ValueError(
                f"num_contexts={self.num_contexts} exceeds the {len(rows)} samples available to "
                "fit; use fewer contexts or more data."
            )
        steps = [_pca(self.pca_components, rows, self.seed)] if self.features == "pca" else []
        self._model = make_pipeline(*steps, self._cluster_model()).fit(rows)
        self._image_shape = tuple(train.images.shape[1:])
        return self

    def assign(self, data: ImageData) -> torch.Tensor:
        """The nearest cluster (most probable component) of each image; labels are not read."""
        if self._model is None:
            raise RuntimeError(f"{type(self).__name__}.assign called before fit(train).")
        return torch.from_numpy(
            _predict(self._model, data, self._image_shape, "predict").astype(np.int64)
        )


@CONTEXTS.register("kmeans", summary="k-means clusters of the images (K = num_contexts)")
class KMeansContexts(_ClusterContexts):
    """Contexts = k-means clusters (k-means++ seeding) of the images.

    Args:
        num_contexts: number of clusters K.
        seed: random seed of the subsample, PCA and k-means.
        features: "pixels" clusters the raw pixels scaled to [0, 1]; "pca" first projects them
            on their ``pca_components`` leading principal components.
        pca_components: dimension of the PCA projection.
        max_fit_samples: cluster at most this many training images (a seeded subsample); all
            images are assigned.
    """

    title: ClassVar[str] = "k-means cluster"
    description: ClassVar[str] = (
        "the k-means cluster of each test image, from the clustering of the training images "
        "(computed from the image alone, no label information)"
    )

    def _cluster_model(self) -> BaseEstimator:
        return KMeans(
            n_clusters=self.num_contexts, init="k-means++", n_init="auto", random_state=self.seed
        )


@CONTEXTS.register(
    "gmm", summary="components of a diagonal Gaussian mixture fitted to the images by EM"
)
class GMMContexts(_ClusterContexts):
    """Contexts = components of a diagonal Gaussian mixture fitted by EM ("EM components").

    Each sample's context is its most probable component. Arguments as for ``KMeansContexts``;
    the mixture starts from k-means++ seeds.
    """

    title: ClassVar[str] = "GMM context"
    description: ClassVar[str] = (
        "the most probable component of each test image under the Gaussian mixture fitted to "
        "the training images (computed from the image alone, no label information)"
    )

    # Image borders are constant within a cluster (zero variance); a floor of 1e-4 on the [0, 1]
    # pixel scale (a standard deviation of 2.5 grey levels) keeps EM finite there, in float32.
    _VARIANCE_FLOOR = 1e-4

    def _cluster_model(self) -> BaseEstimator:
        return GaussianMixture(
            n_components=self.num_contexts,
            covariance_type="diag",
            reg_covar=self._VARIANCE_FLOOR,
            init_params="k-means++",
            random_state=self.seed,
        )


@CONTEXTS.register(
    "superclass",
    summary="superclasses of the labels (oracle, predicted and unknown contexts are tested)",
)
class SuperclassContexts:
    """Contexts = superclasses. Label-derived: see ``label_derived`` and ``ContextPredictor``.

    Args:
        mapping: ``None`` uses the data set's own coarse labels (CIFAR-100's 20 superclasses,
            Pet's cat/dog). Otherwise a fine label -> superclass id mapping covering every class
            (e.g. ``CIFAR10_VEHICLES_ANIMALS``), or the name of one in ``SUPERCLASS_MAPPINGS``.
    """

    label_derived: ClassVar[bool] = True
    title: ClassVar[str] = "oracle context"
    description: ClassVar[str] = (
        "the true superclass of each test image: the papers' protocol, which tells the model "
        "part of the label"
    )

    def __init__(self, mapping: dict[int, int] | str | None = None) -> None:
        if isinstance(mapping, str):
            if mapping not in SUPERCLASS_MAPPINGS:
                known = ", ".join(SUPERCLASS_MAPPINGS)
                raise ValueError(f"unknown mapping {mapping!r}; named mappings: {known}.")
            mapping = SUPERCLASS_MAPPINGS[mapping]
        self._table: torch.Tensor | None = None
        self._fitted = False
        self.num_contexts = 0
        if mapping is not None:
            superclasses = sorted(set(mapping.values()))
            if superclasses != list(range(len(superclasses))):
                raise ValueError(
                    f"mapping must use superclass ids 0..K-1 without gaps; got {superclasses}."
                )
            self.num_contexts = len(superclasses)
        self.mapping = mapping

    def fit(self, train: ImageData) -> SuperclassContexts:
        """Check that the data carry coarse labels (or that the mapping covers every class)."""
        _check_not_empty(train, "train")
        if self.mapping is None:
            if train.coarse_labels is None or train.coarse_classes is None:
                raise ValueError(
                    "this data set has no coarse labels; give a mapping (contexts.options.mapping "
                    "in a config): a {class id: superclass id} dict, or a named one "
                    f"({', '.join(SUPERCLASS_MAPPINGS)})."
                )
            self.num_contexts = len(train.coarse_classes)
            self._fitted = True
            return self
        missing = sorted(set(range(train.num_classes)) - self.mapping.keys())
        if missing:
            raise ValueError(
                f"mapping has no superclass for label(s) {missing}; map every one of the "
                f"{train.num_classes} classes."
            )
        self._table = torch.tensor(
            [self.mapping[label] for label in range(train.num_classes)], dtype=torch.int64
        )
        self._fitted = True
        return self

    def assign(self, data: ImageData) -> torch.Tensor:
        """Each sample's superclass, read from its label: the oracle context."""
        if not self._fitted:
            raise RuntimeError("SuperclassContexts.assign called before fit(train).")
        if self._table is not None:
            if data.num_classes != len(self._table):
                raise ValueError(
                    f"data has {data.num_classes} classes but the mapping was fitted on "
                    f"{len(self._table)}."
                )
            return self._table[data.labels]
        if data.coarse_labels is None:
            raise ValueError(
                "data has no coarse labels; superclass contexts need the data set of fit(train)."
            )
        return data.coarse_labels.clone()


@CONTEXTS.register("class", summary="the classes themselves (K = the number of classes)")
class ClassContexts:
    """Contexts = classes: each sample's context is its label. Label-derived.

    Meant for generation, where a context layer in the generator normalises each generated
    image with the statistics of the class it is generated for (drawn from the classes'
    shares). A classifier given these contexts at test time is given the answer: the
    classification task tests it in the oracle, predicted and unknown views side by side.
    """

    label_derived: ClassVar[bool] = True
    title: ClassVar[str] = "oracle class"
    description: ClassVar[str] = "the true class of each test image: the label itself"

    def __init__(self) -> None:
        self.num_contexts = 0

    def fit(self, train: ImageData) -> ClassContexts:
        """Take K from the number of classes."""
        _check_not_empty(train, "train")
        self.num_contexts = train.num_classes
        return self

    def assign(self, data: ImageData) -> torch.Tensor:
        """Each sample's label."""
        if self.num_contexts == 0:
            raise RuntimeError("ClassContexts.assign called before fit(train).")
        if data.num_classes != self.num_contexts:
            raise ValueError(
                f"data has {data.num_classes} classes but the contexts were fitted on "
                f"{self.num_contexts}."
            )
        return data.labels.clone()


@CONTEXTS.register(
    "domain", summary="the domain stored with each image (digits; an image folder's CSV file)"
)
class DomainContexts:
    """Contexts = visual domains (e.g. source and target in domain adaptation): ``data.domains``."""

    label_derived: ClassVar[bool] = False
    title: ClassVar[str] = "stored domain"
    description: ClassVar[str] = (
        "the domain stored with each test image in the data set (known at deployment, no label "
        "information)"
    )

    def __init__(self) -> None:
        self.num_contexts = 0

    def fit(self, train: ImageData) -> DomainContexts:
        """Check that the data carry domains and take K from their names."""
        _check_not_empty(train, "train")
        if train.domains is None or train.domain_names is None:
            raise ValueError(
                "this data set has no domains; domain contexts need ImageData.domains (the "
                "'digits' data set has them; an image folder reads them from a CSV file given as "
                "data.options.domains in a config)."
            )
        self.num_contexts = len(train.domain_names)
        return self

    def assign(self, data: ImageData) -> torch.Tensor:
        """Each sample's domain id."""
        if self.num_contexts == 0:
            raise RuntimeError("DomainContexts.assign called before fit(train).")
        if data.domains is None:
            raise ValueError("data has no domains; domain contexts need ImageData.domains.")
        return data.domains.clone()


@CONTEXTS.register(
    "random", summary="random contexts with another kind's K and group sizes (the ablation)"
)
class RandomContexts:
    """Contexts drawn at random, fixed per sample: what is left of a kind without its information.

    Each split's contexts are a seeded random permutation of the reference kind's contexts on
    that split: the same K and the same group sizes, with no relation to the images or labels.
    A model that gains as much from these as from the real contexts gains from normalising in
    smaller groups, not from what the contexts know. Without a reference, or with another K
    than the reference's, the groups have sizes as equal as possible; ``num_contexts=1`` is a
    single context for every sample.

    Args:
        num_contexts: K; ``None`` takes the reference's.
        seed: seed of the draw; a split of the same length gets the same draw.
        like: the reference: a context kind (``"gmm"``) or a mapping ``{kind, num_contexts,
            options}`` as in a config's ``contexts`` section.
    """

    label_derived: ClassVar[bool] = False
    title: ClassVar[str] = "random context"
    description: ClassVar[str] = (
        "a random context drawn once for each test image (the ablation: no information)"
    )

    def __init__(
        self,
        num_contexts: int | None = None,
        *,
        seed: int = 0,
        like: str | Mapping[str, Any] | None = None,
    ) -> None:
        if like is None and num_contexts is None:
            raise ValueError(
                "random contexts need num_contexts, or a context kind whose group sizes they copy "
                "(like=...; contexts.options.like in a config)."
            )
        if isinstance(like, Mapping):
            unknown = sorted(set(like) - {"kind", "num_contexts", "options"})
            if unknown or "kind" not in like:
                raise ValueError(
                    "like must be a context kind or a mapping with keys kind, num_contexts and "
                    f"options; got {dict(like)!r}."
                )
        self.num_contexts = num_contexts or 0
        self.seed = seed
        self.like = like
        self._reference: ContextBuilder | None = None

    def fit(self, train: ImageData) -> RandomContexts:
        """Fit the reference kind on the training split, then take K from it where unset."""
        _check_not_empty(train, "train")
        if self.like is not None:
            reference = {"kind": self.like} if isinstance(self.like, str) else dict(self.like)
            if reference["kind"] == "random":
                raise ValueError("like must name a context kind other than 'random'.")
            self._reference = build_contexts(
                reference["kind"],
                reference.get("num_contexts"),
                train,
                seed=self.seed,
                **reference.get("options", {}),
            )
            self.num_contexts = self.num_contexts or self._reference.num_contexts
        return self

    def assign(self, data: ImageData) -> torch.Tensor:
        """A random context per sample with the reference's group sizes on ``data``."""
        if self.num_contexts == 0:
            raise RuntimeError("RandomContexts.assign called before fit(train).")
        reference = self._reference
        if reference is not None and reference.num_contexts == self.num_contexts:
            groups = reference.assign(data).numpy()
        else:
            groups = np.arange(len(data)) % self.num_contexts
        draw = np.random.default_rng([self.seed, len(data)])
        return torch.from_numpy(draw.permutation(groups).astype(np.int64))


class ContextPredictor:
    """Infers a (label-derived) context from the image alone: whitened PCA, then a classifier.

    This gives the second number every label-derived experiment must report: accuracy when the
    context is not told but predicted from the input. The default classifier is a multinomial
    logistic regression, which is linear: it cannot separate contexts whose images differ by a
    contrast inversion (the two 'digits' domains); pass a non-linear scikit-learn classifier for
    such data.

    Args:
        seed: random seed of the subsample and PCA.
        pca_components: dimension of the (whitened) PCA projection of the pixels.
        max_fit_samples: fit on at most this many training images (a seeded subsample).
        classifier: an unfitted scikit-learn classifier with ``predict_proba``; ``None`` means
            ``LogisticRegression(max_iter=1000)``.
    """

    def __init__(
        self,
        *,
        seed: int = 0,
        pca_components: int = 50,
        max_fit_samples: int = 20000,
        classifier: ClassifierMixin | None = None,
    ) -> None:
        self.seed = seed
        self.pca_components = pca_components
        self.max_fit_samples = max_fit_samples
        self.classifier = classifier
        self.num_contexts = 0
        self._model: Pipeline | None = None
        self._image_shape: tuple[int, ...] = ()

    def fit(self, train: ImageData, contexts: torch.Tensor) -> ContextPredictor:
        """Learn to predict ``contexts`` (int64 (N,)) from the ``train`` images.

        ``contexts`` is typically ``SuperclassContexts(...).fit(train).assign(train)``.
        """
        _check_not_empty(train, "train")
        if contexts.dtype != torch.int64 or contexts.shape != (len(train),):
            raise ValueError(
                f"contexts must be int64 of shape ({len(train)},); got {contexts.dtype} "
                f"{tuple(contexts.shape)}."
            )
        if int(contexts.min()) < 0:
            raise ValueError("contexts must be non-negative context ids.")
        self.num_contexts = int(contexts.max()) + 1
        chosen = _fit_indices(len(train), self.max_fit_samples, self.seed)
        targets = contexts[chosen].numpy()
        if len(np.unique(targets)) < 2:
            raise ValueError(
                "contexts take a single value in the fitting sample; there is nothing to predict."
            )
        rows = _pixel_features(train.images[chosen])
        self._model = make_pipeline(
            _pca(self.pca_components, rows, self.seed, whiten=True),
            clone(self.classifier)
            if self.classifier is not None
            else LogisticRegression(max_iter=1000),
        ).fit(rows, targets)
        self._image_shape = tuple(train.images.shape[1:])
        return self

    def predict_proba(self, data: ImageData) -> torch.Tensor:
        """float32 (N, num_contexts): each context's probability (0 for contexts unseen in fit)."""
        if self._model is None:
            raise RuntimeError("ContextPredictor.predict_proba called before fit(train, contexts).")
        seen = _predict(self._model, data, self._image_shape, "predict_proba")
        probabilities = np.zeros((len(data), self.num_contexts), dtype=np.float32)
        probabilities[:, self._model.classes_] = seen
        return torch.from_numpy(probabilities)

    def predict(self, data: ImageData) -> torch.Tensor:
        """int64 (N,): the most probable context of each image."""
        return self.predict_proba(data).argmax(dim=1)
