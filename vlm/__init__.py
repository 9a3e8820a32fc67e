"""vlm: pretraining video-language models with JAX.

    import vlm
    loaded = vlm.load("/path/to/workdir_or_export")   # see vlm/loading.py

`vlm.load` is imported on first use, so `import vlm.<module>` stays as light as that module.
"""


def __getattr__(name: str):
    if name == "load":
        from vlm.loading import load

        return load
    raise AttributeError(f"module 'vlm' has no attribute {name!r}")
