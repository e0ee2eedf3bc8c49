"""Running plans: the one dispatch point and the prepared loop around it.

- :mod:`~fastdiff.runtime.ops`: THE dispatch point: validate a row, pick a backend, prepare a plan;
- :mod:`~fastdiff.runtime.executor`: the prepared loop: buffers, one model call and one program run per row;
- :mod:`~fastdiff.runtime.loop`: the per-row driver shared by the executor's paths;
- :mod:`~fastdiff.runtime.graphs`: CUDA-graph capture and replay of a whole loop;
- :mod:`~fastdiff.runtime.row_terms`: host-side terms of a row (classifier gradient, Langevin operands).
"""
