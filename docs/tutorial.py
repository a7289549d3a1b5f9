# %% [markdown]
# # slotlab tutorial: load a trained model, segment your own image, look at the slots
#
# This file is a notebook in jupytext's percent format: run it as a script (`python docs/tutorial.py`), open it in
# VS Code / PyCharm cell by cell, or turn it into `.ipynb` with `jupytext --to notebook docs/tutorial.py`. The test
# suite runs it (tests/test_api.py), so it stays in step with the library.
#
# It needs a trained run: `make demo` makes `runs/demo` in about ten minutes on a laptop CPU. Any run directory, or
# a folder written by `slotlab export`, works.

# %%
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no screen needed; in Jupyter, drop this line to see the figures inline
import slotlab  # noqa: E402
from slotlab.report.plots import save_figure, slots_figure  # noqa: E402

RUN = os.environ.get("SLOTLAB_RUN", "runs/demo")  # a run directory or an exported model folder
IMAGE = os.environ.get("SLOTLAB_IMAGE", "docs/images/scenes.png")  # any image file: yours
OUT = Path(os.environ.get("SLOTLAB_OUT", "tutorial"))

# %% [markdown]
# ## Load the model
# `slotlab.load` rebuilds the model from the folder alone (its `config.json` and weights).

# %%
model = slotlab.load(RUN, device="cpu")
print(model)

# %% [markdown]
# ## Segment an image
# The image is centre-cropped to a square and resized to the model's resolution. `masks` holds one soft mask per
# slot (they sum to 1 at every pixel), `ids` the slot each pixel went to, `slots` the slot vectors.

# %%
result = model.segment(IMAGE)
print("masks", tuple(result.masks.shape), "slots", tuple(result.slots.shape))
areas = result.masks[0].mean(dim=(1, 2))  # the share of the image each slot took
for k, area in enumerate(areas.tolist()):
    print(f"slot {k}: {area:.1%} of the image")

# %% [markdown]
# ## Look at the slots
# Image | which slot took which pixel | reconstruction | each slot's own picture times its mask.

# %%
decoded = model.decode(result.slots)
figure = slots_figure(result.images, None, result.masks, getattr(decoded, "slot_recons", None), decoded.recon)
print("saved", save_figure(figure, OUT / "slots.png"))

# %% [markdown]
# ## Edit the scene through its slots
# Slots are objects: drop the slot that covers the most foreground (the second-largest area) by giving it the
# background's slot vector, and decode again.

# %%
order = areas.argsort(descending=True)
edited = result.slots.clone()
edited[0, order[1]] = result.slots[0, order[0]]
after = model.decode(edited)
figure = slots_figure(result.images, None, after.masks if after.masks is not None else result.masks,
                      getattr(after, "slot_recons", None), after.recon)
print("saved", save_figure(figure, OUT / "edited.png"))
