"""Loader stub of a DiGSeg model (written by digseg-diffusers; do not edit).

diffusers loads this file when the model is opened with
`DiffusionPipeline.from_pretrained(..., trust_remote_code=True)`. It only imports `DiGSegTextProjection` from the installed
`digseg_diffusers` package, which holds the code.
"""

try:
    from digseg_diffusers.text_projection import DiGSegTextProjection
except ImportError as error:
    raise ImportError(
        "This model is a DiGSeg pipeline: loading it needs the `digseg-diffusers` package "
        "(`pip install git+https://github.com/digseg-diffusers/digseg-diffusers`), which provides `DiGSegTextProjection`. Import error: " + str(error)
    ) from error

__all__ = ["DiGSegTextProjection"]
