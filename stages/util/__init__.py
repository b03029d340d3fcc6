"""Generic helpers of ocibuild: nothing here knows of builds, stores or OCI.

- :mod:`stages.util.aio`: asyncio and subprocesses (cancel-safe waits,
  non-blocking pipes, child exit watches);
- :mod:`stages.util.deeptree`: directory trees of any depth and path length,
  reached through a few open directory fds (no path past PATH_MAX);
- :mod:`stages.util.dirs`: the default directories (one rule, platformdirs);
- :mod:`stages.util.files`: file writes that are whole or absent;
- :mod:`stages.util.lazy`: package attributes loaded on first use;
- :mod:`stages.util.plugins`: objects other distributions offer through
  entry points.

This package imports nothing of ours; every other one may import it.
"""
