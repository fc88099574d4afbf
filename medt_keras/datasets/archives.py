"""Archives the user downloads by hand: found in the manual directory, extracted once.

TFDS's own ``dl_manager.extract`` needs TensorFlow, which this package does
not use, so zips are extracted with Python's ``zipfile``.
"""

import os
import re
import shutil
import zipfile

from medt_keras.datasets.images import DatasetError

def manual_directory(dl_manager):
    """The manual directory as a path string, even when TFDS finds it missing or empty."""
    try:
        return os.fspath(dl_manager.manual_dir)
    except AssertionError:  # TFDS asserts on a missing or empty manual dir; we report the archive instead
        folder = getattr(dl_manager, "_manual_dir", None)
        return os.fspath(folder) if folder is not None else "<no manual directory>"


def extract_zip(archive_path, extract_root):
    """Extracts ``archive_path`` once under ``extract_root``; returns the extracted folder.

    A marker file records the archive's size and modification time: a
    changed archive is extracted again, an unchanged one is reused.
    """
    stem = os.path.splitext(os.path.basename(archive_path))[0]
    target = os.path.join(extract_root, "medt_" + re.sub(r"[^\w.-]+", "_", stem))
    marker = os.path.join(target, ".medt_extracted")
    stat = os.stat(archive_path)
    signature = f"{stat.st_size}:{stat.st_mtime_ns}"
    if os.path.isfile(marker):
        with open(marker) as handle:
            if handle.read() == signature:
                return target
    partial = target + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        with zipfile.ZipFile(archive_path) as archive:
            archive.extractall(partial)  # zipfile drops absolute paths and ".." components
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        shutil.rmtree(partial, ignore_errors=True)
        raise DatasetError(f"{archive_path}: cannot extract the zip archive ({error}).") from error
    with open(os.path.join(partial, ".medt_extracted"), "w") as handle:
        handle.write(signature)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(partial, target)
    return target


def archive_folder(manual_dir, archive, folder, extract_root, holds_data):
    """The folder holding a dataset archive's files, looked for in ``manual_dir``.

    In order: the extracted folder ``manual_dir/folder``; the archive
    ``manual_dir/archive`` (extracted under ``extract_root``, where its
    top folder ``folder`` or the files themselves are expected); the files
    put directly in ``manual_dir``. ``holds_data(path)`` says whether a
    folder holds the files. Nothing found is a ``DatasetError`` naming the
    manual directory and the archive.
    """
    extracted = os.path.join(manual_dir, folder)
    if os.path.isdir(extracted) and holds_data(extracted):
        return extracted
    archive_path = os.path.join(manual_dir, archive)
    if os.path.isfile(archive_path):
        root = extract_zip(archive_path, extract_root)
        for candidate in (os.path.join(root, folder), root):
            if os.path.isdir(candidate) and holds_data(candidate):
                return candidate
        raise DatasetError(f"{archive_path}: the archive does not hold the expected folder {folder!r}.")
    if os.path.isdir(manual_dir) and holds_data(manual_dir):
        return manual_dir
    raise DatasetError(
        f"{manual_dir}: {archive!r} not found there (nor its extracted folder {folder!r}). "
        "Download the archive and put it in this manual directory (see MANUAL_DOWNLOAD_INSTRUCTIONS)."
    )


def visible_files(folder):
    """The file names in ``folder``, without hidden files (``.DS_Store``, macOS ``._*`` copies)."""
    names = (f for f in os.listdir(folder) if not f.startswith("."))
    return sorted(f for f in names if os.path.isfile(os.path.join(folder, f)))
