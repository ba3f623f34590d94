"""The sweep driver's clean-up of a stopped trial's worker placement group (real Ray, no training)."""

from __future__ import annotations

import time


def test_orphan_placement_groups_are_removed_and_live_ones_kept(ray_local):
    ray = ray_local
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from sana_ray.launch.sweep import remove_orphan_placement_groups

    @ray.remote(num_cpus=0.1)
    class Worker:
        def ping(self) -> int:
            return 1

    groups = [placement_group([{"CPU": 0.1}]) for _ in range(2)]
    ray.get([g.ready() for g in groups])
    workers = [Worker.options(scheduling_strategy=PlacementGroupSchedulingStrategy(g)).remote() for g in groups]
    ray.get([w.ping.remote() for w in workers])
    try:
        assert groups[0].id.hex() not in remove_orphan_placement_groups()
        ray.kill(workers[0])  # a stopped trial: its workers are dead, their group is still reserved
        deadline = time.time() + 30
        removed: list[str] = []
        while groups[0].id.hex() not in removed and time.time() < deadline:
            removed += remove_orphan_placement_groups()
            time.sleep(0.5)
        assert groups[0].id.hex() in removed and groups[1].id.hex() not in removed
        assert ray.util.placement_group_table(groups[0])["state"] == "REMOVED"
        assert ray.util.placement_group_table(groups[1])["state"] == "CREATED"
    finally:
        ray.kill(workers[1])
        remove_placement_group(groups[1])
