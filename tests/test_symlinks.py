"""Symlinks in untrusted folders (a model folder, an output folder's artifacts, a shared cache) are
never followed: their targets are not copied into the output, uploaded, or reused."""

from __future__ import annotations

from pathlib import Path

import pytest

from qpipe.results import copy_without_links


@pytest.fixture
def secret(tmp_path) -> Path:
    path = tmp_path / "elsewhere" / "secret.txt"
    path.parent.mkdir()
    path.write_text("someone else's file")
    return path


def linked_folder(root: Path, secret: Path) -> Path:
    """A SavedModel-like folder whose assets/ holds a link to a file and one to a folder outside it."""
    (root / "assets").mkdir(parents=True)
    (root / "saved_model.pb").write_bytes(b"pb")
    (root / "assets" / "vocab.txt").write_text("a b c")
    (root / "assets" / "stolen.txt").symlink_to(secret)
    (root / "assets" / "stolen_dir").symlink_to(secret.parent, target_is_directory=True)
    return root


def test_a_folder_is_copied_without_what_its_links_point_to(tmp_path, secret):
    source = linked_folder(tmp_path / "model", secret)
    skipped = copy_without_links(source, tmp_path / "out" / "model")
    copied = tmp_path / "out" / "model"
    assert sorted(skipped) == ["assets/stolen.txt", "assets/stolen_dir"]
    assert (copied / "assets" / "vocab.txt").read_text() == "a b c" and (copied / "saved_model.pb").exists()
    assert not any(secret.read_text() in p.read_text() for p in copied.rglob("*") if p.is_file())
    assert not (copied / "assets" / "stolen.txt").exists() and not (copied / "assets" / "stolen_dir").exists()
    link = tmp_path / "link.tflite"
    link.symlink_to(secret)
    with pytest.raises(ValueError, match="is a symbolic link"):
        copy_without_links(link, tmp_path / "copy.tflite")


def test_a_stored_chart_replaced_by_a_link_is_neither_copied_nor_written_through(tmp_path, secret):
    from qpipe.cache import reuse_file

    root = tmp_path / "cache"
    made = []

    def make(target: Path) -> None:
        made.append(target)
        target.write_text("a fresh chart")

    first = tmp_path / "one" / "quality_vs_size.png"
    first.parent.mkdir()
    assert reuse_file(root, {"rows": [1]}, first, make) is False
    (stored,) = [p for p in root.rglob("*.png")]
    stored.unlink()
    stored.symlink_to(secret)  # a shared cache whose chart file now points at someone else's file
    second = tmp_path / "two" / "quality_vs_size.png"
    second.parent.mkdir()
    assert reuse_file(root, {"rows": [1]}, second, make) is False
    assert second.read_text() == "a fresh chart" and len(made) == 2
    assert secret.read_text() == "someone else's file"  # nor was the fresh chart written through the link


def test_qpipe_log_uploads_no_link_from_a_folder_artifact(tmp_path, secret, capsys):
    """The MLflow plugin's upload (used by qpipe run and qpipe log) against a real sqlite store."""
    from mlflow import MlflowClient
    from qpipe_mlflow.store import upload

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("links", artifact_location=str(tmp_path / "artifacts"))
    run = client.create_run(experiment).info.run_id
    folder = linked_folder(tmp_path / "out" / "variant_model", secret)
    loose = tmp_path / "out" / "loose.txt"
    loose.symlink_to(secret)
    upload(client, run, {"note.txt": "hi"}, [folder, loose])
    local = Path(client.download_artifacts(run, "", str(tmp_path / "back")))
    names = sorted(str(p.relative_to(local)) for p in local.rglob("*"))
    assert "variant_model/assets/vocab.txt" in names and "note.txt" in names
    assert not any("stolen" in n or n == "loose.txt" for n in names), names
    assert not any(secret.read_text() in p.read_text(errors="ignore") for p in local.rglob("*") if p.is_file())
    said = capsys.readouterr().err
    assert "variant_model/assets/stolen.txt is a symbolic link; it was not uploaded" in said
    assert f"{loose} is a symbolic link; it was not uploaded" in said
