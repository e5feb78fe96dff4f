import numpy as np
import pytest

from edgeq.data import Preprocessing, calibration_batches, load_data
from edgeq.errors import DataError


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


def test_split_is_deterministic(ds):
    again = load_data()
    assert again.test.sha256() == ds.test.sha256()
    assert len(ds.test.sha256()) == 64


def test_preprocessing_matches_torchvision_normalize(ds):
    pre = Preprocessing()
    x = pre.apply(ds.test.images[:3])
    assert x.shape == (3, 1, 28, 28) and x.dtype == np.float32
    assert x.min() == pytest.approx((0 - 0.1307) / 0.3081, abs=1e-6)
    assert x.max() == pytest.approx((1 - 0.1307) / 0.3081, abs=1e-6)


def test_calibration_batches_come_from_training_data(ds):
    batches = calibration_batches(ds, Preprocessing(), count=100, batch=32)
    assert [len(b) for b in batches] == [32, 32, 32, 4]


def test_missing_data_dir_is_a_one_line_error(tmp_path):
    with pytest.raises(DataError, match="no such directory.*--download"):
        load_data(tmp_path / "nope")


def test_data_dir_without_mnist_is_a_one_line_error(tmp_path):
    with pytest.raises(DataError, match="MNIST not found") as info:
        load_data(tmp_path)
    assert "\n" not in str(info.value)
