import importlib

import tilefuse

COMMAND_FUNCTIONS = ["synth", "ingest", "info", "train", "predict", "evaluate", "export"]


def test_api_mirrors_the_commands_and_stays_callable_after_engine_imports():
    # importing every engine module must not shadow an API function with a module of the same name
    for module in ["synthetic", "rasters", "quicklook", "inference", "prediction", "training", "metrics", "sampling"]:
        importlib.import_module(f"tilefuse.{module}")
    for name in COMMAND_FUNCTIONS:
        function = getattr(tilefuse, name)
        assert callable(function) and function.__module__ == f"tilefuse.pipelines.{name}", name
    assert callable(tilefuse.open_scene) and callable(tilefuse.wrap_module)
