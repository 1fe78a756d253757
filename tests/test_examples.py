"""The examples' data path: the MNIST IDX reader, and a one-epoch run on fake MNIST."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture
def examples_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))


def test_mnist_idx_reader_on_fake_files(tmp_path, examples_on_path):
    import digits_data

    paths = digits_data.write_fake_mnist(tmp_path, num_train=50, num_test=20)
    images = digits_data.read_idx(paths["train_images"])
    assert images.shape == (50, 28, 28) and images.dtype == np.uint8
    labels = digits_data.read_idx(paths["train_labels"])
    assert labels.shape == (50,) and labels.max() < 10
    data = digits_data.load_dataset(tmp_path, seed=0)
    assert data.num_features == 784 and len(data.test.y) == 20
    assert len(data.train.y) + len(data.val.y) == 50


def test_truncated_idx_file_is_a_clear_error(tmp_path, examples_on_path):
    import digits_data

    paths = digits_data.write_fake_mnist(
        tmp_path, num_train=10, num_test=5, compress=False
    )
    path = pathlib.Path(paths["test_images"])
    raw = digits_data.read_idx(path)
    assert raw.shape == (5, 28, 28)
    with open(path, "rb") as f:
        head = f.read()
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / path.name).write_bytes(head[: len(head) // 2])
    with pytest.raises(Exception, match="IDX header says shape"):
        digits_data.read_idx(cut / path.name)


def test_digits_example_runs_one_epoch_on_fake_mnist(tmp_path, examples_on_path):
    import digits
    import digits_data

    digits_data.write_fake_mnist(tmp_path, num_train=300, num_test=60)
    result = digits.main(
        [
            "--data-dir",
            str(tmp_path),
            "--epochs",
            "1",
            "--no-plots",
            "--min-accuracy",
            "0.5",
        ]
    )
    # The fake images encode the class in a square's position: a parser that misaligns
    # images and labels stays near chance (0.1).
    assert result["test_accuracy"] >= 0.9
    assert np.isfinite(result["temperature"]) and result["temperature"] > 0
