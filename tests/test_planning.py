"""How a foreach's splits are spread over Airflow's mapped task instances
(metaflow_services/planning.py), and the input paths a join hands Metaflow."""

from __future__ import annotations

import pytest

from metaflow_services.planning import MAX_SPLITS_PER_RANGE, compress_paths, split_ranges


def covers(ranges, n):
    return [i for lo, hi in ranges for i in range(lo, hi)] == list(range(n))


@pytest.mark.parametrize("n", [1, 3, 8])
def test_a_narrow_foreach_maps_one_split_per_instance(n):
    assert split_ranges(n, slots=4, max_map_length=1024) == [[i, i + 1] for i in range(n)]


@pytest.mark.parametrize("n,slots", [(9, 4), (300, 4), (1000, 4), (10_000, 4), (301, 5)])
def test_a_wide_foreach_maps_ranges_about_two_per_slot(n, slots):
    ranges = split_ranges(n, slots=slots, max_map_length=1024)
    assert covers(ranges, n)
    sizes = [hi - lo for lo, hi in ranges]
    assert max(sizes) - min(sizes) <= 1  # even: no range waits on a longer one
    assert max(sizes) <= MAX_SPLITS_PER_RANGE
    if n <= 2 * slots * MAX_SPLITS_PER_RANGE:
        assert len(ranges) == 2 * slots
    else:  # 10,000 splits: ranges of at most 250, so a retried range re-reads little
        assert len(ranges) == -(-n // MAX_SPLITS_PER_RANGE)


def test_never_more_instances_than_airflow_maps():
    ranges = split_ranges(1_000_000, slots=4, max_map_length=1024)
    assert len(ranges) == 1024 and covers(ranges, 1_000_000)


def test_compressed_input_paths_are_what_metaflow_reads():
    from metaflow.util import decompress_list

    paths = ["af-1234/work/t-%d" % i for i in range(10_000)]
    packed = compress_paths(paths)
    assert decompress_list(packed) == paths
    assert len(packed.encode()) < 128 * 1024  # one argument of a command line
    for few in (["af-1/a/t-0"], ["af-1/a/t-0", "af-1/b/t-0"], ["x/t-1", "x/t-10", "x/t-1x"]):
        assert decompress_list(compress_paths(few)) == few
