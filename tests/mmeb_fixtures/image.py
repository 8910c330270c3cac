"""A miniature of the 36 MMEB-V2 image sets in their published layout and schema.

    ROOT/ziyjiang/MMEB_Test_Instruct/<Task>/test-00000-of-00001.parquet
        qry_inst, qry_text, qry_img_path, tgt_inst: string; tgt_text, tgt_img_path: list<string> ("" = absent)
    ROOT/TIGER-Lab/MMEB-V2/image-tasks/MMEB/<Task>/Test/<file>.jpg|.png    tiny images the rows point at

The first row of every set uses the strings of the sets' first published rows as the authors' audit tests and
data cards record them (`tests/evaluate/test_mmeb_image_group_{a,b}_audit.py`, `docs/en/datasets/eval/image/`),
split into instruction and text so that VLM2Vec's parsers rebuild exactly those prompts. The raw `qry_inst` /
`tgt_inst` strings themselves are not published in any source read here; their shape (placeholder, then a newline
or a space, then the instruction) is chosen to be the one VLM2Vec's "consistent with v1 eval" repairs expect.

A few rows exercise the readers' edge cases: an OK-VQA row with a blank candidate, a VizWiz question with a
trailing space, candidate images shared between rows (VisDial, WebQA, RefCOCO-Matching; WebQA and
RefCOCO-Matching with a different caption on a later occurrence of the same candidate name), and one PNG image
per set.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

ANNOTATIONS = "ziyjiang/MMEB_Test_Instruct"
IMAGE_ROOT = "TIGER-Lab/MMEB-V2/image-tasks/MMEB"

CLS_IMAGE = "<|image_1|>\nRepresent the given image for classification"
QA_INST = "<|image_1|> Represent the given image with the following question:"
CROPPED = "<|image_1|>\nRepresent the given cropped image of the object"
REPRESENT = "<|image_1|>\nRepresent the given image."
VISDIAL_DIALOG = (
    "Q:is the photo in color\nA:yes\nQ:is it a professional photo\nA:no\nQ:is it well lit\nA:no\nQ:is it daytime\n"
    "A:i don't see windows\nQ:does this look like an adults bedroom\nA:maybe\nQ:is the room clean\nA:no\n"
    "Q:can you tell what kind of computer it is\nA:no not really\nQ:is it a flat screen\nA:yes\n"
    "Q:what's the desk made out of\nA:cheap plastic or wood\nQ:is there a computer chair\nA:yes"
)
WEBQA_CAPTION = (
    "2020-05-08 15 17 05 Minnetonka Rhododendron flower along Tranquility Court in the Franklin Farm section of "
    "Oak Hill, Fairfax County, Virginia Minnetonka Rhododendron flower along Tranquility Court in the Franklin Farm "
    "section of Oak Hill, Fairfax County, Virginia."
)
OVEN_CAPTION = (
    "Titisee. The Titisee is a lake in the southern Black Forest in Baden-Württemberg. It covers an area of 1.3 "
    "(km2) and is an average of 20 (m) deep. It owes its formation to the Feldberg glacier, the moraines of which "
    "were formed in the Pleistocene epoch and nowadays form the shores of the lake. The lake's outflow, at 840 (m) "
    "above sea level, is the River Gutach, which merges with the Haslach stream below Kappel to form the Wutach. "
    "The waters of the Titisee thus drain eventually into the Upper Rhine between Tiengen and Waldshut. On the "
    "north shore lies the."
)
NEWS = "Indian National Congress Vice President Rahul Gandhi addresses the special plenary session of " \
       "Confederation of Indian Industr in New Delhi on April 4 2013."


def _labels(inst: str, *rows: tuple[str, list[str]]) -> dict:
    return {"qry_inst": inst, "rows": list(rows)}


# Text-candidate sets (image_cls, image_qa, image_i2t): rows of (qry_text, tgt_text).
TEXT_SETS: dict[str, dict] = {
    "ImageNet-1K": _labels(CLS_IMAGE,
                           ("", ["coucal", "Italian greyhound", "plane, carpenter's plane, woodworking plane",
                                 "tabby, tabby cat"]),
                           ("", ["Italian greyhound", "coucal", "tabby, tabby cat"]),
                           ("", ["tabby, tabby cat", "coucal", "Italian greyhound",
                                 "plane, carpenter's plane, woodworking plane"])),
    "N24News": _labels("<|image_1|>\nRepresent the given news image with the following caption for domain "
                       "classification:",
                       ("Anthony Pidgeon", ["Travel", "Style", "Sports", "Science"]),
                       ("Ms. Goodman styled Amber Valletta with wings for a 1993 shoot by Peter Lindbergh for "
                        "Harper's Bazaar.", ["Style", "Travel", "Sports", "Science"]),
                       ("The team celebrated after the final whistle.", ["Sports", "Style", "Travel"])),
    "HatefulMemes": _labels("<|image_1|>\nRepresent the given image for binary classification to determine "
                            "whether it constitutes hateful speech or not",
                            ("", ["Yes", "No"]), ("", ["No", "Yes"]), ("", ["No", "Yes"])),
    "VOC2007": _labels("<|image_1|>\nIdentify the object shown in the image",
                       ("", ["chair", "dog", "bicycle", "bird"]), ("", ["dog", "chair", "bird"]),
                       ("", ["bicycle", "bird", "chair", "dog"])),
    "SUN397": _labels("<|image_1|>\nIdentify the scene shown in the image",
                      ("", ["firing range indoor", "gazebo exterior", "abbey", "bakery shop"]),
                      ("", ["gazebo exterior", "abbey", "firing range indoor"]),
                      ("", ["abbey", "bakery shop", "gazebo exterior"])),
    "Place365": _labels("<|image_1|>\nIdentify the scene shown in the image",
                        ("", ["berth", "pharmacy", "airfield", "canyon"]), ("", ["pharmacy", "berth", "canyon"]),
                        ("", ["canyon", "airfield", "berth"])),
    "ImageNet-A": _labels(CLS_IMAGE, ("", ["Rottweiler", "goldfish", "mushroom", "volcano"]),
                          ("", ["Rottweiler", "volcano", "goldfish"]), ("", ["mushroom", "Rottweiler", "goldfish"])),
    "ImageNet-R": _labels(CLS_IMAGE, ("", ["flute", "goldfish", "hammerhead", "pelican"]),
                          ("", ["flute", "pelican", "goldfish"]), ("", ["hammerhead", "flute", "pelican"])),
    "ObjectNet": _labels("<|image_1|>\nIdentify the object shown in the image",
                         ("", ["tray", "mug", "hammer", "sock"]), ("", ["mug", "tray", "sock"]),
                         ("", ["sock", "hammer", "mug", "tray"])),
    "Country211": _labels("<|image_1|>\nIdentify the country depicted in the image",
                          ("", ["Fiji", "Maldives", "Japan", "Peru"]), ("", ["Maldives", "Fiji", "Peru"]),
                          ("", ["Peru", "Japan", "Fiji"])),
    "OK-VQA": _labels(QA_INST,
                      ("What sport can you use this for?", ["race", "bake it", "", "surf"]),
                      ("Name the type of plant this is?", ["vine", "octogon", "fern"]),
                      ("What is this animal called?", ["horse", "race", "vine"])),
    "A-OKVQA": _labels(QA_INST,
                       ("What is in the motorcyclist's mouth?", ["cigarette", "thirty", "apple", "helmet"]),
                       ("Which number birthday is probably being celebrated?", ["thirty", "cigarette", "ten"]),
                       ("What is the man holding?", ["umbrella", "thirty", "cigarette"])),
    "DocVQA": _labels(QA_INST,
                      ("What is the ‘actual’ value per 1000, during the year 1975?",
                       ["0.28", "1992", "university of california", "Postcards"]),
                      ("What is name of university?", ["university of california", "Postcards", "0.28"]),
                      ("What is the date mentioned in this letter?", ["June 1, 1964", "1992", "0.28"])),
    "InfographicsVQA": _labels(QA_INST,
                               ("Which social platform has heavy female audience?",
                                ["pinterest", "runny nose, cough, sore throat", "doers, artists"]),
                               ("Which three business types is Pinterest good for?",
                                ["restaurants, interior design, wedding venues", "doers, artists", "pinterest"]),
                               ("What percentage of users are male?", ["32%", "pinterest", "doers, artists"])),
    "ChartQA": _labels(QA_INST,
                       ("How many food item is shown in the bar graph?", ["14", "11.8", "0.57", "Too little"]),
                       ("What is the difference in value between Lamb and Corn?", ["0.57", "Too little", "14"]),
                       ("Is the value of Favorable 38 in 2015?", ["Yes", "No", "14"])),
    "Visual7W": _labels(QA_INST,
                        ("What color is the sidewalk?", ["Gray.", "To receive orders.", "At the computer.",
                                                         "On the street."]),
                        ("Where is the man sitting?", ["At the computer.", "On the street.", "Gray."]),
                        ("Why is the man standing there?", ["To receive orders.", "Gray.", "On the street."])),
    "ScienceQA": _labels(QA_INST,
                         ("Which of the following could Gordon's test show?",
                          ["how steady a parachute with a 1 m vent was at 200 km per hour",
                           "whether a parachute with a 1 m vent would swing too much at 400 km per hour",
                           "if the spacecraft was damaged when using a parachute with a 1 m vent going 200 km per "
                           "hour"]),
                         ("What is the name of the colony shown?", ["New Hampshire", "Virginia", "Georgia",
                                                                    "Delaware"]),
                         ("Which animal's feet are also adapted for swimming?", ["cormorant", "guanaco", "emu"])),
    "VizWiz": _labels(QA_INST,
                      ("Can you tell me what this medicine is please?", ["night time", "tonic wine", "dog years",
                                                                         "advanced boot options"]),
                      ("What is the title of this book? ", ["dog years", "advanced boot options", "night time"]),
                      ("What color is this shirt?", ["blue", "tonic wine", "dog years"])),
    "GQA": _labels(QA_INST,
                   ("What is this bird called?", ["This is a parrot.", "Yes, there is a clock that is gold.",
                                                  "The helmet is light blue."]),
                   ("What color is the helmet in the middle of the image?",
                    ["The helmet is light blue.", "The man is to the right of the American flag.",
                     "This is a parrot."]),
                   ("Is there a clock in the picture?", ["Yes, there is a clock that is gold.", "This is a parrot.",
                                                         "The helmet is light blue.", "No, there is no clock."])),
    "TextVQA": _labels(QA_INST,
                       ("what is the brand of this camera?", ["dakota", "rose", "copenhagen", "dino buzzati"]),
                       ("what does the small white text spell?", ["copenhagen", "dino buzzati", "dakota"]),
                       ("what number is on the jersey?", ["23", "rose", "dakota"])),
    "MSCOCO_i2t": _labels("<|image_1|>\nFind an image caption describing the given everyday image.",
                          ("", ["A man with a red helmet on a small moped on a dirt road.",
                                "A man standing in front of an old truck.",
                                "A young girl inhales with the intent of blowing out a candle.",
                                "A red fire hydrant is in the snow near a mountain."]),
                          ("", ["A young girl inhales with the intent of blowing out a candle.",
                                "A red fire hydrant is in the snow near a mountain.",
                                "A man standing in front of an old truck."]),
                          ("", ["A red fire hydrant is in the snow near a mountain.",
                                "A man with a red helmet on a small moped on a dirt road.",
                                "A man standing in front of an old truck."])),
    "VisualNews_i2t": _labels("<|image_1|>\nFind a caption for the news in the given photo.",
                              ("", [NEWS, "Some of the 112 portraits already completed.",
                                    "Syracuse Orange head coach Jim Boeheim looks on during the first half against "
                                    "the Georgetown Hoyas at Verizon Center."]),
                              ("", ["A Maryland State Police cruiser sits at a blocked southbound entrance on the "
                                    "BaltimoreWashington Parkway that accesses Fort Meade.", NEWS,
                                    "Some of the 112 portraits already completed."]),
                              ("", ["Some of the 112 portraits already completed.", NEWS,
                                    "Syracuse Orange head coach Jim Boeheim looks on during the first half against "
                                    "the Georgetown Hoyas at Verizon Center."])),
}


def _pairs(qry_inst: str, tgt_inst: str, *rows, query_image: bool) -> dict:
    """rows: (qry_text, [(image key, caption), ...])."""
    return {"qry_inst": qry_inst, "tgt_inst": tgt_inst, "rows": list(rows), "query_image": query_image}


# Image-candidate sets (image_t2i without, image_i2i_vg with a query image): rows of
# (qry_text, [(candidate image key, tgt_text entry), ...]); equal keys in one set are one file.
IMAGE_SETS: dict[str, dict] = {
    "VisDial": _pairs("Represent the given dialogue about an image, which is used for image retrieval:",
                      "<|image_1|>\nRepresent the given image",
                      (VISDIAL_DIALOG, [("c0", ""), ("c1", ""), ("c2", ""), ("c3", "")]),
                      ("Q:is this in a park\nA:yes, i believe it is\nQ:is the guitar new\nA:i don't think so",
                       [("c4", ""), ("c0", ""), ("c2", "")]),
                      ("Q:is there a dog\nA:yes\nQ:is it sunny\nA:no", [("c1", ""), ("c4", ""), ("c3", "")]),
                      query_image=False),
    "MSCOCO_t2i": _pairs("Find me an everyday image that matches the given caption:", REPRESENT,
                         ("A man with a red helmet on a small moped on a dirt road.",
                          [("c0", ""), ("c1", ""), ("c2", ""), ("c3", "")]),
                         ("Man riding a motor bike on a dirt road on the countryside.",
                          [("c1", ""), ("c0", ""), ("c3", "")]),
                         ("A red fire hydrant is in the snow near a mountain.", [("c2", ""), ("c3", ""), ("c0", "")]),
                         query_image=False),
    "VisualNews_t2i": _pairs("Retrieve an image of this news caption.", REPRESENT,
                             (NEWS, [("c0", ""), ("c1", ""), ("c2", "")]),
                             ("A Maryland State Police cruiser sits at a blocked southbound entrance on the "
                              "BaltimoreWashington Parkway that accesses Fort Meade.",
                              [("c1", ""), ("c2", ""), ("c0", "")]),
                             ("Some of the 112 portraits already completed.", [("c2", ""), ("c0", ""), ("c3", "")]),
                             query_image=False),
    "WebQA": _pairs("<|image_1|>\nFind a Wikipedia image that answers this question:",
                    "<|image_1|>\nRepresent the given Wikipedia image with related text information:",
                    ("Does a Minnetonka Rhododendron flower have petals in a cup shape?",
                     [("c0", WEBQA_CAPTION), ("c1", "Louvre - French sculptures - Room 25 - 03."),
                      ("c2", "Torre del Reloj de la Plaza Colón de Antofagasta (1)."), ("c3", "Golden Gate Bridge.")]),
                    ("What water-related object is sitting in front of the Torre del Reloj?",
                     [("c2", "Torre del Reloj de la Plaza Colón de Antofagasta (1)."),
                      ("c1", "Louvre - French sculptures - Room 25 - 03. (a second caption for the same image)"),
                      ("c3", "Golden Gate Bridge.")]),
                    ("What color is the Golden Gate Bridge?", [("c3", "Golden Gate Bridge."), ("c0", WEBQA_CAPTION),
                                                               ("c1", "Louvre - French sculptures - Room 25 - 03.")]),
                    query_image=False),
    "EDIS": _pairs("<|image_1|>\nFind a news image that matches the provided caption:",
                   "<|image_1|>\nRepresent the given image with related text information:",
                   ("Former Israeli president and prime minister Shimon Peres right and Palestinian President Mahmoud "
                    "Abbas arrive at the World Economic Forum in Southern Shuneh Jordan in May 2015.",
                    [("c0", "WorldAs the West pays tribute to Peres, many Arabs recall a legacy of destruction."),
                     ("c1", "Comic RiffsJon Favreau is set to reprise his Iron Man role for Spider Man: Homecoming."),
                     ("c2", "GovBeatColorado students are protesting en masse over a curriculum proposal to promote "
                            "respect for authority.")]),
                   ("Tom Holland makes his debut in the Spidey suit in Captain America Civil War.",
                    [("c1", "Comic RiffsJon Favreau is set to reprise his Iron Man role for Spider Man: Homecoming."),
                     ("c2", "GovBeatColorado students are protesting en masse over a curriculum proposal to promote "
                            "respect for authority."),
                     ("c0", "WorldAs the West pays tribute to Peres, many Arabs recall a legacy of destruction.")]),
                   ("Students rally outside the state capitol.",
                    [("c2", "GovBeatColorado students are protesting en masse over a curriculum proposal to promote "
                            "respect for authority."), ("c3", "SportsThe season opens tonight.")]),
                   query_image=False),
    "Wiki-SS-NQ": _pairs("Find the document image that can answer the given query:",
                         "<|image_1|>\nRepresent the given image",
                         ("who needs to know about the jet stream", [("c0", ""), ("c1", ""), ("c2", ""), ("c3", "")]),
                         ("who founded the red cross to relieve the suffering of the war wounded",
                          [("c1", ""), ("c2", ""), ("c3", "")]),
                         ("when was the first computer invented", [("c2", ""), ("c0", ""), ("c1", "")]),
                         query_image=False),
    "CIRR": _pairs("<|image_1|> Given an image, find a similar everyday image with the described changes:",
                   REPRESENT + "\n",
                   ("Show three bottles of soft drink.", [("c0", ""), ("c1", ""), ("c2", ""), ("c3", "")]),
                   ("Fewer paper towels per pack.", [("c1", ""), ("c2", ""), ("c0", "")]),
                   ("Make the dog sit on the grass.", [("c2", ""), ("c3", ""), ("c1", "")]),
                   query_image=True),
    "NIGHTS": _pairs("<|image_1|> Find a day-to-day image that looks similar to the provided image.",
                     REPRESENT + "\n",
                     ("", [("c0", ""), ("c1", ""), ("c2", "")]), ("", [("c1", ""), ("c0", ""), ("c3", "")]),
                     ("", [("c3", ""), ("c2", ""), ("c0", "")]), query_image=True),
    "OVEN": _pairs("<|image_1|> Retrieve a Wikipedia image-description pair that provides evidence for the question "
                   "of this image:",
                   "<|image_1|>\nRepresent the given Wikipedia image with related text information:",
                   ("What is the name of this place?",
                    [("c0", OVEN_CAPTION),
                     ("c1", "Megumi Nakajima. is a Japanese voice actress and singer, who is affiliated with Stay "
                            "Luck."),
                     ("c2", "OLED. An organic light-emitting diode (OLED or organic LED) is a light-emitting diode.")]),
                   ("What is the category of this location?",
                    [("c2", "OLED. An organic light-emitting diode (OLED or organic LED) is a light-emitting diode."),
                     ("c3", "Selfridges Building, Birmingham. The Selfridges Building is a landmark building in "
                            "Birmingham, England."),
                     ("c0", OVEN_CAPTION)]),
                   ("Which city is this building in?",
                    [("c3", "Selfridges Building, Birmingham. The Selfridges Building is a landmark building in "
                            "Birmingham, England."),
                     ("c1", "Megumi Nakajima. is a Japanese voice actress and singer, who is affiliated with Stay "
                            "Luck."),
                     ("c2", "OLED. An organic light-emitting diode (OLED or organic LED) is a light-emitting diode."),
                     ("c0", OVEN_CAPTION)]),
                   query_image=True),
    "FashionIQ": _pairs("<|image_1|> Find an image to match the fashion image and style note:", REPRESENT + "\n",
                        ("Is shiny and silver with shorter sleeves and fit and flare.",
                         [("c0", ""), ("c1", ""), ("c2", ""), ("c3", "")]),
                        ("Is grey with black design and is a light printed short dress.",
                         [("c1", ""), ("c3", ""), ("c0", "")]),
                        ("Is longer and has no sleeves.", [("c2", ""), ("c0", ""), ("c1", "")]),
                        query_image=True),
    "MSCOCO": _pairs("<|image_1|> Crop the image to to isolate the object labeled as", CROPPED,
                     ('"dog"', [("c0", ""), ("c1", ""), ("c2", ""), ("c3", "")]),
                     ('"hot dog"', [("c4", ""), ("c5", ""), ("c6", "")]),
                     ('"umbrella"', [("c7", ""), ("c8", ""), ("c9", "")]), query_image=True),
    "RefCOCO": _pairs("<|image_1|> Select the portion of the image that follows the language expressions.", CROPPED,
                      ('"bowl behind the others can only see part"', [("c0", ""), ("c1", ""), ("c2", "")]),
                      ('"front bowl w/carrots in it"', [("c1", ""), ("c0", ""), ("c2", ""), ("c3", "")]),
                      ('"little girl"', [("c4", ""), ("c5", ""), ("c6", "")]), query_image=True),
    "RefCOCO-Matching": _pairs("<|image_1|> Select the portion of the image that follows the language expressions:",
                               "<|image_1|>\nSelect the portion of the image that follows the language expressions:",
                               ('"bowl behind the others can only see part"',
                                [("c0", '"Dish in top right corner"'), ("c0", '"front bowl w/carrots in it"'),
                                 ("c1", '"little girl"')]),
                               ('"front bowl w/carrots in it"',
                                [("c0", '"front bowl w/carrots in it"'), ("c0", "Dish in top right corner"),
                                 ("c1", '"pink"'), ("c1", '"green woman"')]),
                               ('"little girl"', [("c1", '"pink"'), ("c1", '"green woman"'),
                                                  ("c0", '"Dish in top right corner"')]),
                               query_image=True),
    "Visual7W-Pointing": _pairs("<|image_1|> Select the portion of the image that answers the question", CROPPED,
                                ('"Which box frames the toilet?"', [("c0", ""), ("c1", ""), ("c2", ""), ("c3", "")]),
                                ('"Which is the stairs under the skater?"', [("c4", ""), ("c5", ""), ("c6", "")]),
                                ('"Which box frames the lamp?"', [("c0", ""), ("c2", ""), ("c1", ""), ("c3", "")]),
                                query_image=True),
}

NAMES = tuple(TEXT_SETS) + tuple(IMAGE_SETS)


def _seed(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("/".join(parts).encode()).digest()[:8], "big")


def _write_image(path: Path, seed: int) -> None:
    """A 28-56 px image of random coloured blocks; PNG or JPEG after the path's suffix."""
    from PIL import Image

    rng = random.Random(seed)
    width, height = rng.randint(28, 56), rng.randint(28, 56)
    image = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
    for _ in range(4):
        x, y = rng.randrange(width - 8), rng.randrange(height - 8)
        image.paste(tuple(rng.randrange(256) for _ in range(3)), (x, y, x + 8, y + 8))
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".png":
        image.save(path, format="PNG")
    else:
        image.save(path, format="JPEG", quality=90)


def _image(root: Path, name: str, stem: str, png: bool = False) -> str:
    """Writes one image (once) and returns its path as the rows spell it: relative to image-tasks/MMEB/."""
    relative = f"{name}/Test/{stem}{'.png' if png else '.jpg'}"
    path = root / IMAGE_ROOT / relative
    if not path.exists():
        _write_image(path, _seed(name, stem))
    return relative


SCHEMA_FIELDS = (("qry_inst", "string"), ("qry_text", "string"), ("qry_img_path", "string"), ("tgt_inst", "string"),
                 ("tgt_text", "list<string>"), ("tgt_img_path", "list<string>"))


def schema():
    import pyarrow as pa

    return pa.schema([(name, pa.list_(pa.string()) if kind.startswith("list") else pa.string())
                      for name, kind in SCHEMA_FIELDS])


def write_table(path: Path, rows: list[dict], table_schema=None) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    table_schema = table_schema if table_schema is not None else schema()
    pq.write_table(pa.Table.from_pylist(rows, schema=table_schema), path)
    return path


def annotation_file(root: Path, name: str) -> Path:
    return Path(root) / ANNOTATIONS / name / "test-00000-of-00001.parquet"


def records(root: Path, name: str) -> list[dict]:
    """The rows of one set (writing their images under `root`)."""
    root = Path(root)
    if name in TEXT_SETS:
        spec = TEXT_SETS[name]
        return [{"qry_inst": spec["qry_inst"], "qry_text": text,
                 "qry_img_path": _image(root, name, f"query_{i}", png=i == 1),
                 "tgt_inst": "", "tgt_text": list(targets), "tgt_img_path": [""] * len(targets)}
                for i, (text, targets) in enumerate(spec["rows"])]
    spec = IMAGE_SETS[name]
    out = []
    for i, (text, candidates) in enumerate(spec["rows"]):
        out.append({"qry_inst": spec["qry_inst"], "qry_text": text,
                    "qry_img_path": _image(root, name, f"query_{i}") if spec["query_image"] else "",
                    "tgt_inst": spec["tgt_inst"],
                    "tgt_text": [caption for _, caption in candidates],
                    "tgt_img_path": [_image(root, name, key, png=key == "c1") for key, _ in candidates]})
    return out


def write(root: Path) -> dict[str, int]:
    """Writes the 36 miniature sets under `root`; returns {name: number of query rows}."""
    counts = {}
    for name in NAMES:
        rows = records(root, name)
        write_table(annotation_file(root, name), rows)
        counts[name] = len(rows)
    return counts
