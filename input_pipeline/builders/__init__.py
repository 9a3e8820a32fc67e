"""tensorflow-datasets builders writing ArrayRecord shards that training reads by name.

  video_captions.py  VideoCaptions: video- and image-caption corpora from a JSONL/CSV manifest
                     (`vlm data build`, or `tfds build`); manifest.py reads manifests, media.py
                     probes and optionally re-encodes each file.

Training decodes any dataset with VideoCaptions' features ("video" bytes, "captions", "start",
"end", ...; see video_captions.py). A builder for another corpus layout subclasses
VideoCaptions and overrides `_split_generators` to yield the same examples
(`media.make_example` turns a `manifest.Entry` into one).
"""
