"""ffmpeg: the runtime writes the mp4 with PyAV's bundled FFmpeg libraries (H.264 + AAC), so no system
ffmpeg is needed; a system binary is reported for the official scripts, which call `ffmpeg` themselves."""

from __future__ import annotations

import shutil

from itk.checks.base import Context, Result, Status

ENCODERS = ("libx264", "aac")


def check(ctx: Context | None = None) -> Result:
    system = shutil.which("ffmpeg")
    details = [f"system ffmpeg: {system or 'not found (only the official scripts need it)'}"]
    try:
        import av
    except ImportError as exc:
        return Result("ffmpeg", Status.FAIL, f"PyAV does not import: {exc}", details, "pip install av")
    missing = []
    for name in ENCODERS:
        try:
            av.codec.Codec(name, "w")
        except Exception:  # noqa: BLE001 - PyAV raises several types for an unknown codec
            missing.append(name)
    if missing:
        return Result(
            "ffmpeg", Status.FAIL, f"PyAV {av.__version__} lacks the encoder(s) {', '.join(missing)}", details,
            "pip install --force-reinstall av (the PyPI wheels bundle FFmpeg with libx264 and aac)",
        )
    return Result("ffmpeg", Status.OK, f"PyAV {av.__version__} with bundled FFmpeg (H.264 + AAC)", details)
