"""Use cases: plain functions over the store (mine a shard, cluster a store, evaluate, gate, loop).

The CLI, the Prefect flows (one task = one call) and the tests all call these; nothing here
knows Prefect. Settings arrive as the typed, picklable `Settings` object, so a task can run
on any worker (a process pool here, a Dask worker elsewhere)."""
