"""The contract every other layer builds on, importing nothing above it.

- :mod:`~fastdiff.core.plan`: ``Row`` and ``Plan``, the linear-plan language of every sampler step;
- :mod:`~fastdiff.core.args`: the packed row layout and pointer order (written once);
- :mod:`~fastdiff.core.schedules`: VP, VE and flow noise schedules and their discretizations;
- :mod:`~fastdiff.core.rng`: counter-based Philox noise, bit-identical on every backend;
- :mod:`~fastdiff.core.guidance`: guidance settings and their per-row weights;
- :mod:`~fastdiff.core.validate`: argument checks shared by every entry point.
"""
