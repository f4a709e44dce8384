"""``data.label_map``: coarse (superclass) labels for the ID sets, by a list of coarse ids or by names.

Checked: both forms give the same mapping; train, the carved validation split and test are relabelled,
OOD sets are not; the images are untouched and the fine labels are kept; every malformed map is refused
with an error naming ``data.label_map``, the set and the fix; the model's class count is checked
against the number of superclasses.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from robustft.data import OODDataModule
from robustft.data.sources import DataConfigError, DatasetSpec, load_dataset, resolve_label_map
from robustft.methods.base import ConfigMismatchError

REPO = Path(__file__).resolve().parents[2]
CIFAR = str(REPO / "data/cifar10/cifar10_test_2k.npz")
DTD = str(REPO / "data/dtd/dtd_10class_32.npz")
NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
VEHICLES_LIST = [1, 1, 0, 0, 0, 0, 0, 0, 1, 1]
VEHICLES_BY_NAME = {"animals": ["bird", "cat", "deer", "dog", "frog", "horse"],
                    "vehicles": ["airplane", "automobile", "ship", "truck"]}


def _data(label_map, **kwargs) -> OODDataModule:
    data = OODDataModule(
        train={"source": "npz", "path": CIFAR, "max_samples": 200},
        test={"source": "npz", "path": CIFAR, "max_samples": 50, "seed": 1},
        ood={"far": {"dtd": {"source": "npz", "path": DTD, "max_samples": 20}}},
        label_map=label_map, val_fraction=0.2, **kwargs,
    )
    data.setup("fit")
    return data


def test_list_and_name_forms_relabel_train_val_and_test_but_not_ood() -> None:
    fine = load_dataset(DatasetSpec(source="npz", path=CIFAR, max_samples=200), "data.train")
    by_list, by_name = _data(VEHICLES_LIST), _data(VEHICLES_BY_NAME)
    want = np.asarray(VEHICLES_LIST)[fine.labels]
    for data in (by_list, by_name):
        assert data.num_classes == 2
        assert np.array_equal(data.train_images.labels, want)
        assert np.array_equal(data.train_images.fine_labels, fine.labels)
        assert set(data.test_dataset().labels.tolist()) == {0, 1}
        val = data.val_dataset()
        assert len(val) == 40 and set(val.labels.tolist()) <= {0, 1}
        assert data._loaded["ood/dtd"].labels.max() > 1  # OOD labels untouched
        sample = data.train_dataset()[3]
        assert sample["label"] == int(want[data._train_indices[3]])
        image, _ = fine[int(data._train_indices[3])]
        assert np.array_equal(np.asarray(image), np.asarray(data.train_images[int(data._train_indices[3])][0]))
    assert by_name.class_names == ["animals", "vehicles"] and by_list.class_names == ["0", "1"]
    # ids and names may be mixed; dict order gives the coarse ids
    mixed, names = resolve_label_map({"vehicles": [0, "automobile", 8, "truck"], "animals": [2, 3, 4, 5, 6, 7]}, NAMES, "data.train")
    assert mixed.tolist() == [0, 0, 1, 1, 1, 1, 1, 1, 0, 0] and names == ["vehicles", "animals"]


@pytest.mark.parametrize(("label_map", "message"), [
    ([1, 1, 0], "the list has 3 entries but data.train has 10 classes"),
    ([0, 0, 2, 2, 2, 2, 2, 2, 0, 0], r"\[1\] are unused"),
    ([1, 1, 0, 0, 0, 0, 0, 0, 1, -1], "integer coarse ids >= 0"),
    ([True, 1, 0, 0, 0, 0, 0, 0, 1, 1], "integer coarse ids >= 0"),
    ({"animals": ["bird", "cat", "deer", "dog", "frog", "horse"], "vehicles": ["airplane", "car", "ship", "truck"]},
     "'car', which is not a class of data.train"),
    ({"animals": ["bird", "cat", "deer", "dog", "frog", "horse", "ship"], "vehicles": ["airplane", "automobile", "ship", "truck"]},
     "'ship' is listed under both 'animals' and 'vehicles'"),
    ({"animals": ["bird", "cat", "deer", "dog", "frog", "horse"], "vehicles": ["airplane", "ship"]},
     r"classes \['automobile', 'truck'\] are in no coarse class"),
    ({"animals": [], "vehicles": NAMES}, "'animals' needs a non-empty list"),
    ({"vehicles": [0, 1, 12]}, "class id 12; ids are 0..9"),
    ({}, "the mapping is empty"),
])
def test_malformed_maps_are_refused_naming_the_field(label_map, message: str) -> None:
    with pytest.raises(DataConfigError, match=message) as info:
        _data(label_map)
    assert "data.label_map" in str(info.value)


def test_wrong_type_is_refused_at_construction_and_model_class_count_is_checked() -> None:
    with pytest.raises(DataConfigError, match="data.label_map"):
        OODDataModule(train={"source": "npz", "path": CIFAR}, test={"source": "npz", "path": CIFAR}, label_map="vehicles")
    from robustft.methods.look import LOOK

    model = LOOK(num_classes=10)
    model._trainer = type("T", (), {"datamodule": _data(VEHICLES_LIST)})()  # what setup() reads
    with pytest.raises(ConfigMismatchError, match="num_classes: 2"):
        model.setup("fit")
    assert torch.is_tensor(model.queue.labels)
