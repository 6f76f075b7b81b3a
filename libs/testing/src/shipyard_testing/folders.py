"""Model folders written by tests, in the form the image build API takes."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Mapping


def folder_tar(files: Mapping[str, str]) -> bytes:
    """A model folder (file name → text) as a gzipped tar: the body of ``StartBuild`` and
    of the REST facade's ``POST /builds``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()
