"""tts: whether speech from text (`itk run --text`) can run here: its optional packages (`itk[tts]`) and
Kokoro-82M's files with the English pipeline its G2P reads (`itk fetch --component tts`). Optional: a machine
without it makes videos from recorded speech all the same, so its absence is a skip with the fix, never a fail.
Nothing heavy is imported (the packages are found, not loaded)."""

from __future__ import annotations

from itk.checks.base import Context, Result, Status


def check(ctx: Context) -> Result:
    from itk.runtime.tts import TtsFolders, list_voices, problem

    folders = TtsFolders.under(ctx.weights_dir)
    why = problem(folders)
    if why is not None:
        return Result("tts", Status.SKIP, f"speech from text not set up: {why.message} ({why.fix})", [], why.fix)
    voices = list_voices(folders.kokoro)
    return Result("tts", Status.OK, f"speech from text ready (Kokoro-82M, {len(voices)} voice(s): "
                  f"{', '.join(voices[:4])}{' ...' if len(voices) > 4 else ''})", [str(folders.kokoro)])
