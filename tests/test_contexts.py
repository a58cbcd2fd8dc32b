"""Context builders: ranges, determinism, label-free assignment, superclasses, the predictor."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from sklearn.neural_network import MLPClassifier

from contextnorm.contexts import (
    CIFAR10_VEHICLES_ANIMALS,
    CONTEXTS,
    ContextBuilder,
    ContextPredictor,
    DomainContexts,
    GMMContexts,
    KMeansContexts,
    SuperclassContexts,
    build_contexts,
    label_derived,
)
from contextnorm.data import ImageData, load_dataset
from contextnorm.tasks.data import context_names


@pytest.fixture(scope="module")
def digits_train() -> ImageData:
    return load_dataset("digits", None, "train")


@pytest.fixture(scope="module")
def digits_test() -> ImageData:
    return load_dataset("digits", None, "test")


def ten_class_data(num_samples: int = 40, seed: int = 0) -> ImageData:
    rng = np.random.default_rng(seed)
    return ImageData(
        images=torch.from_numpy(rng.integers(0, 256, (num_samples, 3, 4, 4), dtype=np.uint8)),
        labels=torch.arange(num_samples) % 10,
        classes=[f"c{i}" for i in range(10)],
    )


def agreement_up_to_renaming(first: torch.Tensor, second: torch.Tensor) -> float:
    """Share of samples on which two 2-way partitions agree, allowing the two ids to be swapped."""
    same = (first == second).float().mean().item()
    return max(same, 1 - same)


# --- k-means and GMM ------------------------------------------------------------------------------


@pytest.mark.parametrize("builder_class", [KMeansContexts, GMMContexts])
def test_clusters_are_in_range_deterministic_and_find_the_domains(
    builder_class, digits_train, digits_test
) -> None:
    builder = builder_class(2, seed=3).fit(digits_train)
    assert isinstance(builder, ContextBuilder) and builder.num_contexts == 2
    contexts = builder.assign(digits_test)
    assert contexts.dtype == torch.int64 and contexts.shape == (len(digits_test),)
    assert contexts.min() >= 0 and contexts.max() < 2
    assert torch.equal(builder_class(2, seed=3).fit(digits_train).assign(digits_test), contexts)
    # The two visual domains are the dominant structure of the pixels: two clusters recover them.
    assert agreement_up_to_renaming(contexts, digits_test.domains) == 1.0


@pytest.mark.parametrize("builder_class", [KMeansContexts, GMMContexts])
def test_assignment_never_reads_labels(builder_class, digits_train, digits_test) -> None:
    builder = builder_class(4, seed=0).fit(digits_train)
    scrambled = replace(
        digits_test, labels=torch.zeros_like(digits_test.labels), domains=None, domain_names=None
    )
    assert torch.equal(builder.assign(scrambled), builder.assign(digits_test))
    relabelled_train = replace(digits_train, labels=digits_train.labels.flip(0))
    assert torch.equal(
        builder_class(4, seed=0).fit(relabelled_train).assign(digits_test),
        builder.assign(digits_test),
    )


def test_kmeans_on_pca_features_and_subsampled_fit(digits_train, digits_test) -> None:
    builder = KMeansContexts(
        3, seed=1, features="pca", pca_components=500, max_fit_samples=200
    ).fit(digits_train)
    contexts = builder.assign(digits_test)
    assert set(contexts.tolist()) == {0, 1, 2}
    assert builder._model[0].n_components_ == 64  # clipped to the 64 pixels of a digit


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"num_contexts": 0}, "num_contexts must be an int >= 1"),
        ({"num_contexts": 2.5}, "num_contexts must be an int >= 1"),
        ({"num_contexts": 2, "features": "edges"}, "features must be"),
    ],
)
def test_cluster_builders_reject_bad_arguments(arguments: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        KMeansContexts(**arguments)


def test_cluster_builders_reject_impossible_data(digits_train, digits_test) -> None:
    with pytest.raises(ValueError, match="exceeds the 5 samples"):
        GMMContexts(6).fit(digits_train.subset(range(5)))
    with pytest.raises(ValueError, match="train is empty"):
        KMeansContexts(2).fit(digits_train.subset([]))
    with pytest.raises(RuntimeError, match="before fit"):
        KMeansContexts(2).assign(digits_test)
    builder = KMeansContexts(2).fit(digits_train)
    resized = load_dataset("digits", None, "test", image_size=4)
    with pytest.raises(ValueError, match="same image_size"):
        builder.assign(resized)


# --- superclasses and domains ---------------------------------------------------------------------


def test_superclass_from_coarse_labels() -> None:
    data = replace(
        ten_class_data(), coarse_labels=torch.arange(40) % 3, coarse_classes=["p", "q", "r"]
    )
    builder = build_contexts("superclass", None, data)
    assert builder.num_contexts == 3 and torch.equal(builder.assign(data), data.coarse_labels)
    with pytest.raises(ValueError, match="no coarse labels"):
        SuperclassContexts().fit(ten_class_data())


def test_cifar10_vehicles_animals_mapping() -> None:
    data = ten_class_data()
    builder = build_contexts("superclass", 2, data, mapping=CIFAR10_VEHICLES_ANIMALS)
    contexts = builder.assign(data)
    vehicles = {0, 1, 8, 9}  # airplane, automobile, ship, truck
    assert contexts.tolist() == [0 if label in vehicles else 1 for label in data.labels.tolist()]
    named = SuperclassContexts("cifar10-vehicles-animals").fit(data)
    assert torch.equal(named.assign(data), contexts)


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        ({label: 0 for label in range(9)}, r"no superclass for label\(s\) \[9\]"),
        ({label: 2 * (label % 2) for label in range(10)}, "without gaps"),
        ("animals", "unknown mapping"),
    ],
)
def test_superclass_mapping_errors(mapping, message) -> None:
    with pytest.raises(ValueError, match=message):
        SuperclassContexts(mapping).fit(ten_class_data())


def test_domain_contexts(digits_train, digits_test) -> None:
    builder = build_contexts("domain", 2, digits_train)
    assert torch.equal(builder.assign(digits_test), digits_test.domains)
    with pytest.raises(ValueError, match="no domains"):
        DomainContexts().fit(ten_class_data())
    with pytest.raises(ValueError, match="no domains"):
        builder.assign(ten_class_data())


def test_class_contexts_are_the_labels(digits_train, digits_test) -> None:
    builder = build_contexts("class", None, digits_train)
    assert builder.num_contexts == 10
    assert torch.equal(builder.assign(digits_test), digits_test.labels)
    assert context_names("class", digits_train, 10) == digits_train.classes
    with pytest.raises(ValueError, match="has 10 'class' contexts"):
        build_contexts("class", 3, digits_train)
    one_class = ImageData(digits_test.images[:4], torch.zeros(4, dtype=torch.int64), ["0"])
    with pytest.raises(ValueError, match="fitted on 10"):
        builder.assign(one_class)


# --- factory and flags ----------------------------------------------------------------------------


def test_factory_checks_kind_and_count(digits_train) -> None:
    assert list(CONTEXTS) == ["kmeans", "gmm", "superclass", "class", "domain", "random"]
    assert isinstance(build_contexts("gmm", 3, digits_train, seed=1, features="pca"), GMMContexts)
    with pytest.raises(ValueError, match="num_contexts is required"):
        build_contexts("kmeans", None, digits_train)
    with pytest.raises(ValueError, match="has 2 .domain. contexts"):
        build_contexts("domain", 3, digits_train)
    with pytest.raises(ValueError, match="unknown context kind"):
        build_contexts("clusters", 2, digits_train)


def test_label_derived() -> None:
    assert [label_derived(kind) for kind in CONTEXTS] == [False, False, True, True, False, False]
    with pytest.raises(ValueError, match="unknown context kind"):
        label_derived("oracle")


# --- inferring contexts from the input ------------------------------------------------------------


def test_context_predictor_infers_domains_from_pixels(digits_train, digits_test) -> None:
    predictor = ContextPredictor(pca_components=20).fit(digits_train, digits_train.domains)
    assert (predictor.predict(digits_test) == digits_test.domains).float().mean() > 0.98
    probabilities = predictor.predict_proba(digits_test)
    assert probabilities.shape == (len(digits_test), 2)
    assert torch.allclose(probabilities.sum(dim=1), torch.ones(len(digits_test)))


def test_context_predictor_with_a_nonlinear_classifier(digits_train, digits_test) -> None:
    superclasses = SuperclassContexts({label: int(label >= 5) for label in range(10)}).fit(
        digits_train
    )
    classifier = MLPClassifier(hidden_layer_sizes=(64,), max_iter=300, random_state=0)
    predictor = ContextPredictor(pca_components=30, classifier=classifier).fit(
        digits_train, superclasses.assign(digits_train)
    )
    accuracy = (predictor.predict(digits_test) == superclasses.assign(digits_test)).float().mean()
    assert accuracy > 0.85  # well above the 0.5 of guessing, from pixels of both domains


def test_context_predictor_gives_zero_probability_to_unseen_contexts(digits_train) -> None:
    contexts = torch.where(digits_train.domains == 0, 0, 2)
    probabilities = (
        ContextPredictor(pca_components=5).fit(digits_train, contexts).predict_proba(digits_train)
    )
    assert probabilities.shape[1] == 3 and probabilities[:, 1].abs().max() == 0


def test_context_predictor_rejects_bad_targets(digits_train) -> None:
    with pytest.raises(ValueError, match="int64 of shape"):
        ContextPredictor().fit(digits_train, digits_train.domains[:10])
    with pytest.raises(ValueError, match="single value"):
        ContextPredictor().fit(digits_train, torch.zeros(len(digits_train), dtype=torch.int64))
    with pytest.raises(RuntimeError, match="before fit"):
        ContextPredictor().predict(digits_train)


# --- random contexts: the ablation ----------------------------------------------------------------


def test_random_contexts_keep_k_and_group_sizes_but_carry_no_information(
    digits_train, digits_test
) -> None:
    builder = build_contexts("random", None, digits_train, seed=1, like="domain")
    assert builder.num_contexts == 2
    for data in (digits_train, digits_test):
        contexts = builder.assign(data)
        assert torch.equal(torch.bincount(contexts), torch.bincount(data.domains))
        assert torch.equal(builder.assign(data), contexts), "fixed per sample"
        # Half of the samples keep their domain by chance alone.
        assert 0.4 < (contexts == data.domains).float().mean() < 0.6
    redrawn = build_contexts("random", None, digits_train, seed=2, like="domain")
    assert not torch.equal(redrawn.assign(digits_train), builder.assign(digits_train))

    clusters = {"kind": "kmeans", "num_contexts": 4, "options": {"features": "pca"}}
    like_kmeans = build_contexts("random", None, digits_train, seed=0, like=clusters)
    reference = build_contexts("kmeans", 4, digits_train, seed=0, features="pca")
    assert torch.equal(
        torch.bincount(like_kmeans.assign(digits_test), minlength=4),
        torch.bincount(reference.assign(digits_test), minlength=4),
    )
    single = build_contexts("random", 1, digits_train, like="domain")
    assert single.assign(digits_test).unique().tolist() == [0]
    equal = torch.bincount(build_contexts("random", 3, digits_train).assign(digits_train))
    assert equal.max() - equal.min() <= 1


def test_random_contexts_explain_what_they_need(digits_train) -> None:
    with pytest.raises(ValueError, match="random contexts need num_contexts"):
        build_contexts("random", None, digits_train)
    with pytest.raises(ValueError, match="other than 'random'"):
        build_contexts("random", None, digits_train, like="random")
    with pytest.raises(ValueError, match="mapping with keys kind, num_contexts and options"):
        build_contexts("random", None, digits_train, like={"kinds": "gmm"})
