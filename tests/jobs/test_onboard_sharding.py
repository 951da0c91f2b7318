from jobs.onboard_data import EncodedConcept
from jobs.onboard_train import shard_of


def test_shards_partition_the_concepts_and_keep_parents_together():
    import numpy as np

    records = [EncodedConcept(f"c{i}", "dress" if i % 2 else "coat", np.zeros((1, 2))) for i in range(9)]
    shards = [shard_of(records, r, 2) for r in range(2)]
    ids = [r.concept_id for s in shards for r in s]
    assert sorted(ids) == sorted(r.concept_id for r in records) and len(ids) == len(set(ids))
    assert {r.parent for r in shards[0]} == {"coat"}  # 5 coats: the first worker holds only coats
    assert shard_of(list(reversed(records)), 1, 2) == shards[1]  # input order does not matter
