"""Object property vocabularies of CLEVRTex-like scenes, and the conversion of a scene json to object extras.

Two families share the json layout (``objects[m]`` has ``shape``, ``size``, ``material``, ``color``, ``3d_coords``):

* the scenes slotlab renders itself (variants ``clevr`` and ``tex``, :mod:`slotlab.data.render`), and
* the real CLEVRTex (variants ``full``, ``pbg``, ``vbg``, ``grassbg``, ``camo``, ``outd``), whose names follow the
  official generator (``clevrtex-generation``). There, ``color`` is only meaningful in ``vbg``; the other variants keep
  whatever the generator wrote.

For set prediction every object becomes a row of :func:`encode_objects`: ``obj_coords`` (``3d_coords`` mapped from
[-3, 3] to [0, 1] as in the Slot Attention paper) and ``obj_props`` (indices into the vocabulary below).
"""

from __future__ import annotations

from typing import Any

import numpy as np

PROPERTY_NAMES = ("shape", "size", "material", "color")
OPTIONAL_PROPERTY = "color"  # real CLEVRTex only colours objects in vbg; a missing colour is stored as -1
MAX_OBJECTS = 10  # rows of the object extras: CLEVR(Tex) scenes hold 3-10 objects
RENDERED_VARIANTS = ("clevr", "tex")
CLEVRTEX_VARIANTS = ("full", "pbg", "vbg", "grassbg", "camo", "outd")

SIZES = ("large", "medium", "small")
# CLEVR's eight colours (alphabetical, as CLEVRTex-vbg), with the sRGB values of CLEVR's properties.json.
COLORS = ("blue", "brown", "cyan", "gray", "green", "purple", "red", "yellow")
COLOR_RGB = {
    "blue": (42, 75, 215), "brown": (129, 74, 25), "cyan": (41, 208, 208), "gray": (87, 87, 87),
    "green": (29, 105, 20), "purple": (129, 38, 192), "red": (173, 35, 35), "yellow": (255, 238, 51),
}

# The rendered scenes. cone and torus are held out of the default shape set (an `outd`-like split).
RENDERED_SHAPES = ("cube", "cylinder", "sphere", "cone", "torus")
DEFAULT_SHAPES = ("cube", "cylinder", "sphere")
RENDERED_MATERIALS = ("rubber", "metal")
SIZE_RADIUS = {"large": 0.7, "medium": 0.5, "small": 0.35}  # CLEVR's "r" of an object of each size

# Real CLEVRTex (clevrtex-generation): 4 shapes + 4 out-of-distribution ones; 60 Poliigon materials + 25 held out
# (outd), and vbg's two plain ones.
CLEVRTEX_SHAPES = ("cube", "cylinder", "monkey", "sphere", "cone", "icosahedron", "teapot", "torus")
CLEVRTEX_MATERIALS = (
    "PoliigonBricks01", "PoliigonBricksFlemishRed001", "PoliigonBricksPaintedWhite001",
    "PoliigonCarpetTwistNatural001", "PoliigonChainmailCopperRoundedThin001",
    "PoliigonCityStreetAsphaltGenericCracked002", "PoliigonCityStreetRoadAsphaltTwoLaneWorn001",
    "PoliigonCliffJagged004", "PoliigonCobblestoneArches002", "PoliigonConcreteWall001", "PoliigonFabricDenim003",
    "PoliigonFabricFleece001", "PoliigonFabricLeatherBuffaloRustic001", "PoliigonFabricRope001",
    "PoliigonFabricUpholsteryBrightAnglePattern001", "PoliigonGroundClay002", "PoliigonGroundDirtForest014",
    "PoliigonGroundDirtRocky002", "PoliigonGroundForest003", "PoliigonGroundForest008",
    "PoliigonGroundForestMulch001", "PoliigonGroundForestRoots001", "PoliigonGroundMoss001",
    "PoliigonGroundSnowPitted003", "PoliigonGroundTireTracks001", "PoliigonInteriorDesignRugStarryNight001",
    "PoliigonMarble062", "PoliigonMarble13", "PoliigonMetalCorrodedHeavy001", "PoliigonMetalCorrugatedIronSheet002",
    "PoliigonMetalDesignerWeaveSteel002", "PoliigonMetalPanelRectangular001", "PoliigonMetalSpottyDiscoloration001",
    "PoliigonMetalStainlessSteelBrushed", "PoliigonPlaster07", "PoliigonPlaster17", "PoliigonRoadCityWorn001",
    "PoliigonRoofTilesTerracotta004", "PoliigonRustMixedOnPaint012", "PoliigonRustPlain007",
    "PoliigonSolarPanelsPolycrystallineTypeBFramedClean001", "PoliigonStoneBricksBeige015",
    "PoliigonStoneMarbleCalacatta004", "PoliigonTerrazzoVenetianMatteWhite001", "PoliigonTiles05",
    "PoliigonTilesMarbleChevronCreamGrey001", "PoliigonTilesMarbleSageGreenBrickBondHoned001",
    "PoliigonTilesOnyxOpaloBlack001", "PoliigonTilesRectangularMirrorGray001", "PoliigonWallMedieval003",
    "PoliigonWaterDropletsMixedBubbled001", "PoliigonWoodFineDark004", "PoliigonWoodFlooring044",
    "PoliigonWoodFlooring061", "PoliigonWoodFlooringMahoganyAfricanSanded001",
    "PoliigonWoodFlooringMerbauBrickBondNatural001", "PoliigonWoodPlanks028", "PoliigonWoodPlanksWorn33",
    "PoliigonWoodQuarteredChiffon001", "WhiteMarble",
    # outd
    "PoliigonBrickOldRed001", "PoliigonCarpetPlushDesignerRhombus001", "PoliigonChainmailGoldRounded001",
    "PoliigonChippedPaint015", "PoliigonCliffJagged007", "PoliigonDrywallPrepared007",
    "PoliigonFabricUpholsteryPyramidsPattern001", "PoliigonGroundClay006", "PoliigonGroundClay008",
    "PoliigonGroundDirtForestRoots004", "PoliigonGroundDirtRocky006", "PoliigonGroundGrassGreen",
    "PoliigonGroundRocky006", "PoliigonGroundRocky014", "PoliigonGroundSandFootprintsLeaves001",
    "PoliigonMetalSiding004", "PoliigonMetalStainlessSteelBraided001", "PoliigonPanelsAcousticFoamTiles004",
    "PoliigonPlasterSloppy", "PoliigonRoofTilesCeramic001", "PoliigonRoofTilesCopper003",
    "PoliigonRoofTilesQuarry001", "PoliigonRustPlain030", "PoliigonSteelFloorDiamond001",
    "PoliigonTilesTerrazzoPalladianaHonedGreen001",
    # vbg
    "MyMetal", "Rubber",
)


def property_values(variant: str) -> dict[str, list[str]]:
    """The vocabulary ``{property name: [values]}`` of a dataset variant (rendered or real CLEVRTex)."""
    if variant in RENDERED_VARIANTS:
        return {"shape": list(RENDERED_SHAPES), "size": list(SIZES), "material": list(RENDERED_MATERIALS),
                "color": list(COLORS)}
    return {"shape": list(CLEVRTEX_SHAPES), "size": list(SIZES), "material": list(CLEVRTEX_MATERIALS),
            "color": list(COLORS)}


def encode_objects(objects: list[dict[str, Any]], values: dict[str, list[str]],
                   max_objects: int = MAX_OBJECTS) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Scene json objects -> ``obj_coords`` float32 ``[max_objects, 3]``, ``obj_props`` int64 ``[max_objects, 4]``
    and a note for every value that could not be used.

    Row ``m`` is ``objects[m]`` (mask id ``m + 1``); padding rows have coordinates 0 and properties -1. A value outside
    the vocabulary (a new material, a colour given as RGB, ...) or a missing one is kept as unknown (-1, coordinates
    0) and noted: object discovery never needs it, and set prediction refuses data with such notes. Names are matched
    case-insensitively (CLEVRTex writes some materials in lower case); a missing ``color`` is expected (CLEVRTex only
    colours objects in vbg) and not noted.

    Raises:
        ValueError: more than ``max_objects`` objects, or an object that is not a mapping (the caller names the file).
    """
    if len(objects) > max_objects:
        raise ValueError(f"{len(objects)} objects, more than the {max_objects} the object extras hold")
    lookup = {name: {v.lower(): i for i, v in enumerate(vocab)} for name, vocab in values.items()}
    coords = np.zeros((max_objects, 3), dtype=np.float32)
    props = np.full((max_objects, len(PROPERTY_NAMES)), -1, dtype=np.int64)
    unknown: list[str] = []
    for m, obj in enumerate(objects):
        if not isinstance(obj, dict):
            raise ValueError(f"object {m} is not a mapping")
        try:
            xyz = [float(c) for c in obj["3d_coords"]]
            if len(xyz) != 3:
                raise ValueError
            coords[m] = (np.array(xyz) + 3.0) / 6.0  # [-3, 3] -> [0, 1] (Slot Attention paper, set prediction)
        except (KeyError, TypeError, ValueError):
            unknown.append(f"object {m}: no valid 3d_coords")
        for p, name in enumerate(PROPERTY_NAMES):
            if name not in obj:
                if name != OPTIONAL_PROPERTY:
                    unknown.append(f"object {m}: no {name}")
                continue
            index = lookup[name].get(str(obj[name]).lower())
            if index is None:
                unknown.append(f"object {m}: unknown {name} {obj[name]!r}")
            else:
                props[m, p] = index
    return coords, props, unknown
