"""A stand-in for the ``_C_cuda`` extension that runs nothing and records, in order, every launch
and the stream it was given: for the CPU-side tests of the cuda backend's stream and graph flow."""

from __future__ import annotations

from fastdiff.core.args import PTR_NAMES


class FakeExt:
    """``_C_cuda`` that records the stream of every launch."""

    PTR_NAMES = list(PTR_NAMES)

    def __init__(self) -> None:
        self.launches: list[tuple[str, int]] = []
        ext = self

        class Program:
            def __init__(self, max_blocks: int = 0) -> None:
                self.n = 0

            def add(self, *args) -> int:
                self.n += 1
                return self.n - 1

            def set(self, i, which, ptr) -> None:
                pass

            def run(self, i, m, stream) -> None:
                ext.launches.append((f"run {i}", stream))

        self.Program = Program

    def step(self, *args) -> None:
        stream, max_blocks, u_copies = args[-3:]
        self.launches.append(("step", stream))

    def bits(self, out, seeds, batch, groups, row, stream_id, stream) -> None:
        self.launches.append(("bits", stream))
