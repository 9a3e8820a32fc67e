"""`vlm embed` and `vlm retrieve`: a corpus's video and caption embeddings on disk, and search over them.

    vlm embed --workdir=W --output=O                         # the run's eval split
    vlm embed --export=D --name=my_videos --split=test --data_dir=DIR --output=O
    vlm embed --workdir=W --manifest=clips/manifest.jsonl --output=O   # media files, no dataset build
    vlm retrieve --index=O --text="a dog runs on a beach" --k=10
    vlm retrieve --index=O --video=query.mp4 --k=10

The output folder has clip-retrieval's layout, which autofaiss and clip-retrieval's back end read:

  O/img_emb/img_emb_<p>.npy           float16 [n_p, E] video embeddings (unit norm), of process p
  O/text_emb/text_emb_<p>.npy         float16 [n_p, E] embeddings of each row's (first) caption
  O/metadata/metadata_<p>.parquet     n_p rows, aligned with both: image_path (the media path, "" for
                                      the synthetic set), caption, id (unique), index (the row in its
                                      split or manifest), split
  O/info.json                         model, step, embed_dim, count, processes, source, dtype

<p> is the process index, zero-padded to the width of the process count, so the parts sort in
process order; each process writes the rows it read (rows of every global batch are dealt to the
processes as in evaluation), so N processes write the same rows as one, split differently.
Videos are decoded exactly as the eval split is (`ClipDecoder`, no rng), captions tokenized with
the run's tokenizer; rows whose media fail to decode are left out and counted. Retrieval scores
are cosine similarities (the embeddings are unit norm), searched with faiss when it is installed,
else with numpy.
"""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np
from etils import epath

from vlm import sharding

PARTS = ("img_emb", "text_emb", "metadata")
COLUMNS = ("image_path", "caption", "id", "index", "split")


class ManifestRecords:
    """Random-access records of a manifest's entries, shaped like a built dataset's records."""

    def __init__(self, manifest: str, split: str | None = None):
        from input_pipeline.builders import manifest as manifest_lib

        entries = manifest_lib.read_manifest(manifest, allow_outside=True).entries
        self.entries = [e for e in entries if split is None or e.split == split]
        if not self.entries:
            raise ValueError(f"{manifest} has no rows{f' in split {split!r}' if split else ''} to embed")

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        e = self.entries[index]
        return {"video": epath.Path(e.path).read_bytes(), "captions": list(e.captions), "start": e.start,
                "end": e.end, "id": e.id, "path": e.path, "split": e.split}


class _Indexed:
    def __init__(self, source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        return {**self.source[int(index)], "index": int(index)}


class RowDecoder:
    """A record → the eval pipeline's example (the ClipDecoder's, or a synthetic record's) plus the
    row's host-side fields: id, path, index, split."""

    def __init__(self, decoder, split: str, blank: dict):
        self.decoder, self.split, self._blank = decoder, split, blank

    def __call__(self, record: dict, rng) -> dict:
        if self.decoder is None:  # synthetic: already decoded
            example = {"video": record["video"], "caption": record["caption"]}
        else:
            example = self.decoder(record, rng)
        record_id = record.get("id", f"{self.split}/{record['index']}")
        record_id = record_id.decode() if isinstance(record_id, bytes) else str(record_id)
        return {**example, "id": record_id, "path": str(record.get("path", record_id if self.decoder else "")),
                "index": np.int64(record["index"]), "split": str(record.get("split", self.split))}

    def blank(self) -> dict:
        return {**self._blank, "id": "", "path": "", "index": np.int64(-1), "split": ""}


def _rows(loaded, *, name, split, data_dir, manifest, global_batch_size: int):
    """This process's batches of rows to embed: the eval pipeline's layout, plus host fields."""
    import grain

    from input_pipeline import datasets, pipeline

    data = loaded.config.data.copy_and_resolve_references()
    if name:
        data.name = name
    if data_dir:
        data.data_dir = data_dir
    decoder = datasets.ClipDecoder(data)
    if manifest:
        source, split = ManifestRecords(manifest, split or None), split or "manifest"
    elif data.name == datasets.SYNTHETIC:
        split = split or datasets.eval_split(data)
        source, decoder = pipeline._data_source(data, split), None
    else:
        split = split or datasets.eval_split(data)
        datasets.check_split(data.name, data.data_dir, split, "--split")
        source = datasets.records(data.name, split, data.data_dir)
    blank = decoder.blank() if decoder else {"video": np.zeros(loaded.clip_shape, np.uint8), "caption": ""}
    index, count = jax.process_index(), jax.process_count()
    shard = pipeline._PaddedEvalShard(_Indexed(source), global_batch_size, global_batch_size // count, index,
                                      decoder=RowDecoder(decoder, split, blank))
    dataset = (grain.MapDataset.source(shard).batch(global_batch_size // count)
               .map(pipeline.TokenizeCaptions(loaded.tokenizer, loaded.max_text_len, keep_captions=True)))
    return pipeline._with_prefetch(dataset, data), len(source), split


def part_name(kind: str, process: int, count: int) -> str:
    suffix = ".parquet" if kind == "metadata" else ".npy"
    return f"{kind}/{kind}_{process:0{len(str(max(count - 1, 0)))}d}{suffix}"


def embed(model_path: str, output: str, *, name: str | None = None, split: str | None = None,
          data_dir: str | None = None, manifest: str | None = None, batch_size: int | None = None) -> dict:
    """Writes this process's parts of O (see the module docstring); returns O/info.json's content."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from flax import nnx
    from jax.experimental import multihost_utils

    from vlm import loading
    from vlm.tasks import contrastive

    loaded = loading.load(model_path, devices=jax.devices())
    shards = loaded.mesh.shape["data"] * loaded.mesh.shape["fsdp"]
    rows = batch_size or int(loaded.config.get("eval_batch_size", loaded.batch_size))
    rows = math.lcm(shards, jax.process_count()) * -(-rows // math.lcm(shards, jax.process_count()))
    batches, total, split = _rows(loaded, name=name, split=split, data_dir=data_dir, manifest=manifest,
                                  global_batch_size=rows)
    graphdef = nnx.graphdef(loaded.model)
    state = nnx.state(loaded.model)
    spec = jax.sharding.PartitionSpec(sharding.BATCH_AXES)
    with sharding.use_mesh(loaded.mesh, loaded.rules):
        video_parts, text_parts, meta = [], [], {c: [] for c in COLUMNS}
        for local in batches:
            batch = sharding.global_batch({"video": local["video"], "tokens": local["tokens"]}, loaded.mesh)
            out = contrastive.embed_pair(graphdef, state, batch)  # the retrieval eval's own step
            video_emb, text_emb = out["video"], out["text"]
            mask = np.asarray(local["mask"])
            for out, parts in ((video_emb, video_parts), (text_emb, text_parts)):
                mine = multihost_utils.global_array_to_host_local_array(out, loaded.mesh, spec)
                parts.append(np.asarray(mine)[mask].astype(np.float16))
            meta["image_path"] += [str(p) for p in np.asarray(local["path"])[mask]]
            meta["caption"] += [str(c) for c in np.asarray(local["caption"])[mask]]
            meta["id"] += [str(i) for i in np.asarray(local["id"])[mask]]
            meta["index"] += [int(i) for i in np.asarray(local["index"])[mask]]
            meta["split"] += [str(s) for s in np.asarray(local["split"])[mask]]
    dim = int(loaded.config.model.embed_dim)
    folder, p, n = epath.Path(output), jax.process_index(), jax.process_count()
    for kind, parts in (("img_emb", video_parts), ("text_emb", text_parts)):
        array = np.concatenate(parts) if parts else np.zeros((0, dim), np.float16)
        _save_npy(folder / part_name(kind, p, n), array)
    table = pa.table({"image_path": pa.array(meta["image_path"], pa.string()),
                      "caption": pa.array(meta["caption"], pa.string()), "id": pa.array(meta["id"], pa.string()),
                      "index": pa.array(meta["index"], pa.int64()), "split": pa.array(meta["split"], pa.string())})
    path = folder / part_name("metadata", p, n)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        pq.write_table(table, f)
    counts = multihost_utils.process_allgather(np.array([len(meta["id"])])) if n > 1 else np.array([len(meta["id"])])
    info = {"model": os.fspath(model_path), "step": loaded.step, "embed_dim": dim, "count": int(np.sum(counts)),
            "skipped": int(total - np.sum(counts)), "processes": n, "dtype": "float16",
            "source": manifest or f"{name or loaded.config.data.name}:{split}"}
    if p == 0:
        (folder / "info.json").write_text(json.dumps(info, indent=2))
    return info


def _save_npy(path: epath.Path, array: np.ndarray) -> None:
    import io

    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.save(buffer, array)
    path.write_bytes(buffer.getvalue())


def read_index(folder: str) -> tuple[np.ndarray, np.ndarray, dict[str, list]]:
    """(video embeddings float32 [N, E], text embeddings float32 [N, E], metadata columns), all parts in order."""
    import pyarrow.parquet as pq

    root = epath.Path(folder)
    if not (root / "metadata").exists():
        raise FileNotFoundError(f"{root}/metadata not found; --index must be the --output folder of `vlm embed`")
    arrays = []
    for kind in ("img_emb", "text_emb"):
        parts = sorted((root / kind).glob(f"{kind}_*.npy"), key=lambda p: p.name)
        arrays.append(np.concatenate([np.load(p.open("rb")) for p in parts]).astype(np.float32))
    columns: dict[str, list] = {}
    for part in sorted((root / "metadata").glob("metadata_*.parquet"), key=lambda p: p.name):
        with part.open("rb") as f:
            for key, values in pq.read_table(f).to_pydict().items():
                columns.setdefault(key, []).extend(values)
    return arrays[0], arrays[1], columns


def top_k(embeddings: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores [k], rows [k]) of the best inner products with `query` [E]: faiss when installed, else numpy."""
    k = min(k, len(embeddings))
    try:
        import faiss
    except ImportError:
        scores = embeddings @ query
        rows = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
        rows = rows[np.lexsort((rows, -scores[rows]))]  # best first; ties by row
        return scores[rows], rows
    index = faiss.IndexFlatIP(embeddings.shape[1])
    index.add(np.ascontiguousarray(embeddings, np.float32))
    scores, rows = index.search(np.ascontiguousarray(query[None], np.float32), k)
    return scores[0], rows[0]


def retrieve(index: str, *, text: str | None = None, video: str | None = None, k: int = 10,
             model_path: str | None = None) -> list[dict]:
    """The k best rows of the index for a text query (among videos) or a video query (among captions)."""
    from vlm import loading

    if (text is None) == (video is None):
        raise ValueError("give exactly one of --text and --video")
    info = json.loads((epath.Path(index) / "info.json").read_text())
    loaded = loading.load(model_path or info["model"])
    video_emb, text_emb, meta = read_index(index)
    if text is not None:
        query, pool = loaded.embed_text([text])[0], video_emb
    else:
        query, pool = loaded.embed_video([video])[0], text_emb
    scores, rows = top_k(pool, query, k)
    return [{"rank": r + 1, "score": float(s), **{c: meta[c][int(i)] for c in ("id", "caption", "image_path")}}
            for r, (s, i) in enumerate(zip(scores, rows))]
