"""Input cache: identical eval inputs with and without it, reuse across builds, invalidation."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import test_av_loaders as fx  # noqa: E402  (fixture writers)

from mmbalance.data import build_dataset  # noqa: E402
from mmbalance.data.datasets.av import CremaDOptions  # noqa: E402


def test_cache_matches_no_cache_and_invalidates(tmp_path):
    root, cdir = tmp_path / "cremad", tmp_path / "cache"
    fx.make_cremad(root, n_train=2, n_test=1)
    o = CremaDOptions(image_size=16)
    plain = build_dataset("cremad", o, fx.cfg(root), 0)
    cached = build_dataset("cremad", o, fx.cfg(root, cache=str(cdir)), 0)
    for split in ("test", "val"):
        for i in range(len(plain.splits[split])):
            a, b = plain.splits[split][i]["inputs"], cached.splits[split][i]["inputs"]
            for m in a:
                assert torch.equal(a[m], b[m]), (split, i, m)
    dirs = [d for d in cdir.iterdir() if d.is_dir()]
    assert len(dirs) == 1 and (dirs[0] / "manifest.json").exists()
    core = cached.test.core
    assert core.cache.filled("audio") >= len(cached.test)
    # a second build reuses the filled cache; reads come from the memory map
    again = build_dataset("cremad", o, fx.cfg(root, cache=str(cdir)), 0)
    assert again.test.core.cache.dir == dirs[0] and again.test.core.cache.filled("visual.visual") >= len(again.test)
    assert torch.equal(again.test[0]["inputs"]["visual"], plain.test[0]["inputs"]["visual"])
    # train transforms are applied on top of the cached frames: same generator -> same crops
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    plain.train.generator, again.train.generator = g1, g2
    assert torch.equal(plain.train[0]["inputs"]["visual"], again.train[0]["inputs"]["visual"])
    # a preprocessing change gives a new cache folder
    build_dataset("cremad", CremaDOptions(image_size=16, hop=300), fx.cfg(root, cache=str(cdir)), 0)
    build_dataset("cremad", CremaDOptions(image_size=16, base_size=20), fx.cfg(root, cache=str(cdir)), 0)
    assert len([d for d in cdir.iterdir() if d.is_dir()]) == 3
    # the same parameters again do not
    build_dataset("cremad", o, fx.cfg(root, cache=str(cdir)), 0)
    assert len([d for d in cdir.iterdir() if d.is_dir()]) == 3


def test_cache_with_dataloader_workers(tmp_path):
    from torch.utils.data import DataLoader
    from mmbalance.data import collate
    root, cdir = tmp_path / "cremad", tmp_path / "cache"
    fx.make_cremad(root, n_train=2, n_test=1)
    b = build_dataset("cremad", CremaDOptions(image_size=16), fx.cfg(root, cache=str(cdir)), 0)
    batches = list(DataLoader(b.test, batch_size=3, num_workers=2, collate_fn=collate))
    assert sum(len(x) for x in batches) == 6
    assert b.test.core.cache.filled("audio") == 6  # written by the workers, visible here
    ref = torch.stack([b.test[i]["inputs"]["audio"] for i in range(3)])
    assert torch.equal(batches[0].inputs["audio"], ref)
