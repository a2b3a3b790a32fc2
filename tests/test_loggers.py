"""lightfn.loggers: files read back with TensorBoard's EventAccumulator and the csv module."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from lightfn.errors import LightfnError
from lightfn.loggers import CSVLogger, Logger, LoggerError, TensorBoardLogger, image_grid


def read_events(log_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


# ----------------------------------------------------------------------------- TensorBoard


def test_tensorboard_scalars_read_back(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path)
    for step in range(5):
        logger.log_metrics({"train/loss": 1.0 / (step + 1), "lr": 0.1}, step=step * 10)
    logger.log_metrics({"val/loss": 0.125, "epoch": 0}, step=40)
    logger.close()

    assert logger.log_dir == tmp_path / "lightfn" / "version_0" and logger.version == 0
    acc = read_events(logger.log_dir)
    assert sorted(acc.Tags()["scalars"]) == ["epoch", "lr", "train/loss", "val/loss"]
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [0, 10, 20, 30, 40]
    assert [e.value for e in loss] == pytest.approx([1.0, 0.5, 1 / 3, 0.25, 0.2])
    assert [(e.step, e.value) for e in acc.Scalars("val/loss")] == [(40, 0.125)]


def test_tensorboard_hparams_in_the_same_run(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path, name="exp")
    logger.log_hparams({"lr": 1e-3, "batch_size": 64, "optimizer": "adam", "model": {"hidden": 64}, "betas": (0.9, 0.99)})
    logger.log_metrics({"val/loss": 0.5}, step=3)
    logger.close()

    acc = read_events(logger.log_dir)
    content = acc.PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in content
    start = HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["lr"].number_value == pytest.approx(1e-3)
    assert start.hparams["batch_size"].number_value == 64
    assert start.hparams["optimizer"].string_value == "adam"
    assert start.hparams["model/hidden"].number_value == 64
    assert start.hparams["betas"].string_value == "[0.9, 0.99]"
    # the scalars are in that same run (one event folder)
    assert acc.Tags()["scalars"] == ["val/loss"]
    loaded = yaml.safe_load((logger.log_dir / "hparams.yaml").read_text())
    assert loaded == {"lr": 0.001, "batch_size": 64, "optimizer": "adam", "model": {"hidden": 64}, "betas": [0.9, 0.99]}
    assert list(loaded) == ["lr", "batch_size", "optimizer", "model", "betas"]  # the order they were logged in


def test_tensorboard_images(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path)
    logger.log_image("recon", torch.rand(3, 12, 20), step=7)
    logger.log_image("gray", torch.zeros(9, 5, dtype=torch.uint8), step=8)
    grid = image_grid(torch.rand(10, 1, 28, 28), nrow=5)
    logger.log_image("grid", grid, step=9)
    logger.close()

    acc = read_events(logger.log_dir)
    assert sorted(acc.Tags()["images"]) == ["gray", "grid", "recon"]
    (recon,) = acc.Images("recon")
    assert (recon.step, recon.width, recon.height) == (7, 20, 12)
    (gray,) = acc.Images("gray")
    assert (gray.step, gray.width, gray.height) == (8, 5, 9)
    (g,) = acc.Images("grid")
    # 2 rows of 5 tiles of 28 pixels with 2-pixel padding
    assert (g.width, g.height) == (5 * 30 + 2, 2 * 30 + 2)


def test_tensorboard_versions_increment(tmp_path: Path) -> None:
    first = TensorBoardLogger(tmp_path)
    first.log_metrics({"a": 1.0}, step=0)
    second = TensorBoardLogger(tmp_path)
    second.log_metrics({"a": 2.0}, step=0)
    assert (first.version, second.version) == (0, 1)
    assert second.log_dir == tmp_path / "lightfn" / "version_1"
    first.close()
    second.close()
    assert [e.value for e in read_events(second.log_dir).Scalars("a")] == [2.0]
    # versions continue after the largest existing one, and name="" drops the sub-folder
    (tmp_path / "lightfn" / "version_7").mkdir()
    assert TensorBoardLogger(tmp_path).version == 8
    flat = TensorBoardLogger(tmp_path / "flat", name="")
    assert flat.log_dir == tmp_path / "flat" / "version_0"
    # an explicit version reuses its folder (resume)
    again = TensorBoardLogger(tmp_path, version=0)
    again.log_metrics({"a": 3.0}, step=1)
    again.close()
    assert [(e.step, e.value) for e in read_events(tmp_path / "lightfn" / "version_0").Scalars("a")] == [
        (0, 1.0),
        (1, 3.0),
    ]


def test_logger_creates_nothing_until_used(tmp_path: Path) -> None:
    TensorBoardLogger(tmp_path / "tb")
    CSVLogger(tmp_path / "csv")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- CSV


def test_csv_header_values_and_widening(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path)
    logger.log_metrics({"train/loss": 0.5, "lr": 0.01}, step=1)
    logger.log_metrics({"train/loss": 0.25, "lr": 0.01}, step=2)
    logger.flush()
    header, rows = read_csv(logger.log_dir / "metrics.csv")
    assert header == ["step", "lr", "train/loss"]
    assert [(r["step"], r["train/loss"], r["lr"]) for r in rows] == [("1", "0.5", "0.01"), ("2", "0.25", "0.01")]

    # a later call brings new keys: the file is rewritten with the wider header
    logger.log_metrics({"val/loss": 0.75, "epoch": 0}, step=2)
    logger.log_metrics({"train/loss": 0.125}, step=3)
    logger.close()
    header, rows = read_csv(logger.log_dir / "metrics.csv")
    assert header == ["step", "epoch", "lr", "train/loss", "val/loss"]
    assert [list(r.values()) for r in rows] == [
        ["1", "", "0.01", "0.5", ""],
        ["2", "", "0.01", "0.25", ""],
        ["2", "0", "", "", "0.75"],
        ["3", "", "", "0.125", ""],
    ]
    assert float(rows[3]["train/loss"]) == 0.125


def test_csv_buffers_and_flushes_every_n_rows(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path, flush_every_n_rows=3)
    logger.log_metrics({"a": 1.0}, step=0)
    logger.log_metrics({"a": 2.0}, step=1)
    assert not (logger.log_dir / "metrics.csv").exists()
    logger.log_metrics({"a": 3.0}, step=2)
    assert len(read_csv(logger.log_dir / "metrics.csv")[1]) == 3
    logger.log_metrics({"a": 4.0}, step=3)
    logger.close()
    assert [r["a"] for r in read_csv(logger.log_dir / "metrics.csv")[1]] == ["1.0", "2.0", "3.0", "4.0"]


def test_csv_resume_appends_to_an_existing_version(tmp_path: Path) -> None:
    with CSVLogger(tmp_path, name="run") as logger:
        logger.log_metrics({"loss": 1.0}, step=0)
    assert logger.version == 0
    with CSVLogger(tmp_path, name="run", version=0) as resumed:
        resumed.log_metrics({"loss": 0.5}, step=1)
        resumed.log_metrics({"acc": 0.9}, step=2)
    header, rows = read_csv(tmp_path / "run" / "version_0" / "metrics.csv")
    assert header == ["step", "acc", "loss"]
    assert [(r["step"], r["acc"], r["loss"]) for r in rows] == [("0", "", "1.0"), ("1", "", "0.5"), ("2", "0.9", "")]
    with CSVLogger(tmp_path, name="run") as fresh:
        fresh.log_metrics({"loss": 2.0}, step=0)
    assert fresh.version == 1


def test_csv_step_metric_must_agree(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path)
    logger.log_metrics({"step": 5, "loss": 1.0}, step=5)
    logger.close()
    header, rows = read_csv(logger.metrics_file)
    assert header == ["step", "loss"] and rows == [{"step": "5", "loss": "1.0"}]
    with pytest.raises(LoggerError, match="disagrees"):
        logger.log_metrics({"step": 4}, step=5)


def test_csv_hparams_yaml(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path)
    logger.log_hparams({"lr": 1e-5, "layers": [784, 64, 3], "precision": "bf16-mixed", "seed": 0})
    logger.log_hparams({"optim": {"name": "adam", "betas": (0.9, 0.999), "eps": 1e-8}, "ckpt": None, "amp": False})
    loaded = yaml.safe_load((logger.log_dir / "hparams.yaml").read_text())
    assert loaded == {
        "lr": 1e-5,
        "layers": [784, 64, 3],
        "precision": "bf16-mixed",
        "seed": 0,
        "optim": {"name": "adam", "betas": [0.9, 0.999], "eps": 1e-8},
        "ckpt": None,
        "amp": False,
    }
    assert type(loaded["lr"]) is float and type(loaded["optim"]["eps"]) is float  # not read back as strings
    logger.log_hparams({"lr": 3e-4})  # a later call overrides, in place
    assert list(yaml.safe_load((logger.log_dir / "hparams.yaml").read_text()).items())[0] == ("lr", 3e-4)


def test_hparams_yaml_edge_cases(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path)
    logger.log_hparams({})
    assert yaml.safe_load((logger.log_dir / "hparams.yaml").read_text()) == {}
    logger.log_hparams(
        {
            "yes": True,
            "a b": 'quote " and\nnewline',
            "inf": float("inf"),
            "nan": float("nan"),
            "t": torch.tensor(2.5),
            "dtype": torch.float16,
            "runs": [{"lr": 0.1, "tags": ["x"]}, {"lr": 0.2, "tags": []}],
            "empty": {},
            "null": "null",
            "unicode": "µ-batch",
            3: "int key",
        }
    )
    loaded = yaml.safe_load((logger.log_dir / "hparams.yaml").read_text(encoding="utf-8"))
    assert math.isnan(loaded.pop("nan"))
    assert loaded == {
        "yes": True,
        "a b": 'quote " and\nnewline',
        "inf": math.inf,
        "t": 2.5,
        "dtype": "torch.float16",
        "runs": [{"lr": 0.1, "tags": ["x"]}, {"lr": 0.2, "tags": []}],
        "empty": {},
        "null": "null",
        "unicode": "µ-batch",
        "3": "int key",
    }


def test_csv_images_are_png_files(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path)
    img = torch.rand(3, 6, 4)
    logger.log_image("val/recon", img, step=12)
    logger.log_image("gray", torch.arange(20, dtype=torch.uint8).reshape(4, 5), step=0)
    files = sorted(p.name for p in (logger.log_dir / "images").iterdir())
    assert files == ["gray_step0.png", "val_recon_step12.png"]
    with Image.open(logger.log_dir / "images" / "val_recon_step12.png") as png:
        assert png.size == (4, 6) and png.mode == "RGB"
        back = torch.from_numpy(np.array(png)).float().permute(2, 0, 1) / 255
    assert torch.allclose(back, img, atol=1 / 255)
    with Image.open(logger.log_dir / "images" / "gray_step0.png") as png:
        assert png.mode == "L" and np.asarray(png).reshape(-1).tolist() == list(range(20))


# ----------------------------------------------------------------------------- shared checks


@pytest.mark.parametrize("cls", [CSVLogger, TensorBoardLogger])
def test_bad_values_are_refused(cls, tmp_path: Path) -> None:
    logger = cls(tmp_path)
    with pytest.raises(LoggerError, match=r"'loss' is a torch.Tensor.*\.item\(\)"):
        logger.log_metrics({"loss": torch.tensor(1.0)}, step=0)
    with pytest.raises(LoggerError, match="'name' must be a real number"):
        logger.log_metrics({"name": "x"}, step=0)
    with pytest.raises(LoggerError, match="step must be an int"):
        logger.log_metrics({"loss": 1.0}, step=1.5)
    with pytest.raises(LoggerError, match="CHW"):
        logger.log_image("batch", torch.rand(2, 3, 8, 8), step=0)
    with pytest.raises(LoggerError, match="float in \\[0, 1\\] or uint8"):
        logger.log_image("ints", torch.zeros(3, 8, 8, dtype=torch.int32), step=0)
    assert isinstance(LoggerError("x"), LightfnError) and isinstance(LoggerError("x"), ValueError)
    logger.close()


def test_custom_logger_needs_only_metrics_and_dir() -> None:
    class ListLogger(Logger):
        def __init__(self) -> None:
            self.rows: list[tuple[int, dict]] = []

        def log_metrics(self, metrics, step):
            self.rows.append((step, dict(metrics)))

        @property
        def log_dir(self) -> Path:
            return Path(".")

        @property
        def version(self) -> int:
            return 0

    with ListLogger() as logger:
        logger.log_metrics({"a": 1.0}, 3)
        logger.log_hparams({"lr": 0.1})
        logger.log_image("x", torch.zeros(1, 2, 2), 3)
    assert logger.rows == [(3, {"a": 1.0})]
    with pytest.raises(TypeError):
        Logger()  # type: ignore[abstract]


def test_image_grid_shapes() -> None:
    assert image_grid(torch.rand(16, 3, 8, 8), nrow=4).shape == (3, 4 * 10 + 2, 4 * 10 + 2)
    assert image_grid(torch.rand(3, 8, 8), nrow=8).shape == (3, 12, 3 * 10 + 2)  # NHW
    assert image_grid([torch.rand(8, 8), torch.rand(8, 8)], nrow=2).shape == (3, 12, 22)
    with pytest.raises(LoggerError):
        image_grid(torch.rand(8))
