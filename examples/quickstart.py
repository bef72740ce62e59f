# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # tilefuse quickstart
#
# A small end-to-end tour on a laptop CPU, in a few minutes: a synthetic SAR + optical
# scene, a look at it, a short training of PAD (its smallest preset), a prediction of an
# unseen scene on a 2-worker dask cluster, the prediction next to the truth, its scores,
# and a Cloud Optimized GeoTIFF.
#
# This notebook is generated from `examples/quickstart.py` (jupytext percent format):
# edit the script, then regenerate the executed notebook with `python examples/build_notebook.py`.
# The test suite runs it top to bottom (`tests/test_notebook.py`).

# %%
from pathlib import Path

import matplotlib.pyplot as plt
import rioxarray
from IPython.display import Image, display

import tilefuse

work = Path("quickstart-output")
work.mkdir(exist_ok=True)
SIZE = 256  # px; real scenes are 10^4 - 10^5 px a side and stream the same way

# %% [markdown]
# ## 1. A scene store
# `tilefuse.synth` writes a synthetic scene (six land-cover classes, optical with clouds,
# SAR with speckle and a swath edge) as a zarr store; `open_scene` opens it lazily as an
# `xarray.Dataset` with its CRS.

# %%
train_store = tilefuse.synth(work / "train.zarr", SIZE, "sar-optical", seed=0, overwrite=True)
scene = tilefuse.open_scene(train_store)
print(scene.rio.crs, scene.rio.resolution())
scene

# %%
display(Image(filename=tilefuse.quicklook_scene(scene, work / "train.png")))

# %% [markdown]
# ## 2. An unseen scene from the xarray ecosystem
# Data usually arrives as lazy DataArrays (rioxarray, stackstac) or Datasets (odc-stac).
# `tilefuse.from_xarray` puts them on one grid with the resampler `tilefuse ingest` uses
# and writes a scene store. Here the second scene comes as GeoTIFFs opened with rioxarray.

# %%
tilefuse.synth(work / "test-synth.zarr", SIZE, "sar-optical", seed=1, geotiff=work / "test-tif", overwrite=True)
arrays = {name: rioxarray.open_rasterio(work / "test-tif" / f"{name}.tif", chunks=128) for name in ("optical", "sar")}
labels = rioxarray.open_rasterio(work / "test-tif" / "label.tif", chunks=128).squeeze("band", drop=True)
test_store = tilefuse.from_xarray(work / "test.zarr", arrays, labels, overwrite=True)
tilefuse.open_scene(test_store)

# %% [markdown]
# ## 3. A short training
# PAD's smallest preset (`atto`) on random 128 px patches of the first scene; the run
# folder holds the checkpoint, `log.jsonl` and the training curves.

# %%
run = tilefuse.train(
    "pad", [train_store], work / "run",
    hparams={"preset": "atto"}, steps=30, batch_size=4, patch_size=128, lr=1e-3, workers=0,
    checkpoint_every=30, overwrite=True, progress=False,
)  # fmt: skip
display(Image(filename=run / "curves.png"))

# %% [markdown]
# ## 4. Predict the unseen scene on a dask cluster
# `cluster="local:2"` starts two worker processes; each loads the checkpoint once.
# The dask dashboard link is printed (it needs bokeh: `pip install -e '.[notebook]'`).

# %%
pred = tilefuse.predict(run, test_store, work / "prediction.zarr", cluster="local:2", overwrite=True, progress=True)
pred

# %% [markdown]
# The prediction next to the truth, with the class legend.

# %%
truth = tilefuse.open_scene(test_store)
names = truth.label.attrs["class_names"]
panels = {
    "prediction": tilefuse.quicklook_labels(pred.labels, names, work / "prediction.png", title="prediction"),
    "truth": tilefuse.quicklook_labels(truth.label, names, work / "truth.png", title="truth"),
}
fig, axes = plt.subplots(1, 2, figsize=(12, 5))
for ax, (title, png) in zip(axes, panels.items()):
    ax.imshow(plt.imread(png))
    ax.set_axis_off()
plt.show()

# %% [markdown]
# ## 5. Scores and a Cloud Optimized GeoTIFF

# %%
metrics = tilefuse.evaluate(work / "prediction.zarr", test_store)
print(f"OA {metrics['overall_accuracy']:.3f}  mIoU {metrics['mean_iou']:.3f}  kappa {metrics['kappa']:.3f}")

# %%
cog = tilefuse.export(work / "prediction.zarr", work / "prediction.tif", overwrite=True, progress=False)
exported = rioxarray.open_rasterio(cog)
print(cog, exported.shape, exported.rio.crs, "nodata", exported.rio.nodata)
