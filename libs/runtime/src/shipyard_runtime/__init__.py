"""shipyard-runtime: the model server inside every Shipyard image.

It loads a model folder's serving script (``serve.py`` or the OCI-style ``score.py``) and
serves predictions over HTTP/1.1 in the Open Inference Protocol v2, KServe v1, Seldon and
raw JSON shapes, with N pre-forked worker processes. ``check`` mode validates a folder the
way the build service needs it. The folder contract is in this package's README.md.

It is installed into each model's own environment, so it uses the standard library only.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
