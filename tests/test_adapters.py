"""omni.data.adapters: the pure record -> raw example mappings (always run) and reading TFDS catalog datasets.

The reading tests that go through the real catalog builders need TensorFlow, because TFDS imports it to construct
the coco_captions and librispeech builders (even under tfds.testing.mock_data); they skip where it is missing.
Without TensorFlow, read_catalog is still exercised on records from TFDS's own fake-example generator, and its
"TensorFlow is missing" error is checked.
"""

import importlib.util
import io

import numpy as np
import pytest
import tensorflow_datasets as tfds

from omni.data import adapters
from omni.errors import CatalogError

HAS_TF = importlib.util.find_spec("tensorflow") is not None
NEEDS_TF = ("TFDS imports TensorFlow to construct the coco_captions/librispeech catalog builders "
            "(install tensorflow-cpu to run this test)")


def needs_tf():
    return pytest.importorskip("tensorflow", reason=NEEDS_TF)


# ---------------------------------------------------------------------------------------------- hand-made records

def coco_record(flavour: str, texts=("A dog on a mat. ", "a brown dog"), image=None) -> dict:
    """A coco_captions record as each TFDS reading path hands it out."""
    image = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3) if image is None else image
    if flavour == "data_source":        # real array_record files: bytes text, Python lists, Python ints
        return {"image": image, "image/id": 42, "image/filename": b"42.jpg",
                "captions": {"text": [t.encode() for t in texts], "id": list(range(len(texts)))}}
    if flavour == "mock_data_source":   # tfds.testing.mock_data: str arrays, numpy scalars
        return {"image": image, "image/id": np.array(42, np.int64), "image/filename": "42.jpg",
                "captions": {"text": np.array(texts, dtype=str), "id": np.arange(len(texts))}}
    assert flavour == "as_numpy"        # tfds.as_numpy(tfds.load(...)): object arrays of bytes
    return {"image": image, "image/id": np.int64(42), "image/filename": b"42.jpg",
            "captions": {"text": np.array([t.encode() for t in texts], dtype=object), "id": np.arange(len(texts))}}


def libri_record(speech=None, text=b"HELLO WORLD") -> dict:
    speech = np.array([0, 16384, -32768, 32767], np.int16) if speech is None else speech
    return {"id": b"1089-134686-0000", "speaker_id": 1089, "chapter_id": np.int64(134686), "text": text,
            "speech": speech}


@pytest.mark.parametrize("flavour", ["data_source", "mock_data_source", "as_numpy"])
def test_coco_captions_first_and_all_from_every_record_flavour(flavour):
    record = coco_record(flavour)
    [first] = adapters.coco_captions(record)
    assert first["id"] == "coco_captions/42/0"
    assert first["targets"] == ["text"]
    assert first["meta"] == {"image_id": 42, "filename": "42.jpg"}
    image, text = first["segments"]
    assert text == {"text": "A dog on a mat."}  # stripped
    assert image["image"].dtype == np.uint8 and image["image"].shape == (4, 5, 3)
    np.testing.assert_array_equal(image["image"], record["image"])

    both = adapters.coco_captions(record, captions="all")
    assert [e["id"] for e in both] == ["coco_captions/42/0", "coco_captions/42/1"]
    assert [e["segments"][1]["text"] for e in both] == ["A dog on a mat.", "a brown dog"]
    assert both[0]["id"] == first["id"]  # the same (image, caption) pair keeps its id across options
    assert all(set(e) == {"id", "targets", "meta", "segments"} for e in both)


def test_coco_captions_skips_empty_captions_and_keeps_encoded_images():
    record = coco_record("data_source", texts=("  ", "a cat", ""))
    record["image"] = b"\xff\xd8\xff fake jpeg"
    assert [e["id"] for e in adapters.coco_captions(record, captions="all")] == ["coco_captions/42/1"]
    [first] = adapters.coco_captions(record)
    assert first["segments"][0] == {"image_bytes": b"\xff\xd8\xff fake jpeg"}
    assert first["segments"][1] == {"text": "a cat"}
    assert adapters.coco_captions(coco_record("data_source", texts=("", " "))) == []
    assert adapters.coco_captions(coco_record("as_numpy", texts=())) == []


def test_coco_captions_images_become_uint8_rgb():
    grey = np.full((3, 2), 7, np.uint8)
    for image in (grey, grey[:, :, None], np.dstack([grey, grey, grey, np.zeros_like(grey)])):
        [example] = adapters.coco_captions(coco_record("data_source", image=image))
        out = example["segments"][0]["image"]
        assert out.shape == (3, 2, 3) and out.dtype == np.uint8 and np.all(out == 7)
    with pytest.raises(ValueError, match="uint8"):
        adapters.coco_captions(coco_record("data_source", image=np.zeros((3, 2, 3), np.float32)))
    with pytest.raises(ValueError, match=r"\[H, W"):
        adapters.coco_captions(coco_record("data_source", image=np.zeros((3, 2, 5), np.uint8)))
    with pytest.raises(ValueError, match="captions="):
        adapters.coco_captions(coco_record("data_source"), captions="every")


def test_librispeech_asr_and_tts():
    record = libri_record()
    [asr] = adapters.librispeech(record)
    assert asr["id"] == "librispeech/asr/1089-134686-0000"
    assert asr["targets"] == ["text"]
    assert asr["meta"] == {"speaker_id": 1089, "chapter_id": 134686}
    audio, text = asr["segments"]
    assert text == {"text": "HELLO WORLD"}
    assert audio["sample_rate"] == 16000
    assert audio["audio"].dtype == np.float32
    np.testing.assert_array_equal(audio["audio"], [0.0, 0.5, -1.0, 32767 / 32768])

    [tts] = adapters.librispeech(record, task="tts")
    assert tts["id"] == "librispeech/tts/1089-134686-0000"
    assert tts["targets"] == ["audio"]
    assert tts["segments"][0] == {"text": "HELLO WORLD"}
    np.testing.assert_array_equal(tts["segments"][1]["audio"], audio["audio"])

    # the str flavour (mock data), a [samples, 1] wave, and records with nothing to learn
    mock_style = {**record, "id": np.str_("a-b-c"), "text": "HI", "speech": record["speech"][:, None]}
    assert adapters.librispeech(mock_style)[0]["segments"][0]["audio"].shape == (4,)
    assert adapters.librispeech(libri_record(text=b"  ")) == []
    assert adapters.librispeech(libri_record(speech=np.zeros(0, np.int16))) == []


def test_librispeech_rejects_bad_records_and_options():
    with pytest.raises(ValueError, match="lazy_decode"):
        adapters.librispeech(libri_record(speech=b"fLaC..."))
    with pytest.raises(ValueError, match="int16"):
        adapters.librispeech(libri_record(speech=np.zeros(4, np.int32)))
    with pytest.raises(ValueError, match="mono"):
        adapters.librispeech(libri_record(speech=np.zeros((4, 2), np.int16)))
    with pytest.raises(ValueError, match="task="):
        adapters.librispeech(libri_record(), task="s2s")


def test_adapter_for_checks_names_and_options_before_opening_anything():
    assert adapters.adapter_for("coco_captions/2014:1.1.0", captions="all").func is adapters.coco_captions
    with pytest.raises(CatalogError, match="adapters exist for: coco_captions, librispeech"):
        adapters.read_catalog("mnist", "train")
    with pytest.raises(CatalogError, match="no option 'task'.*captions=first\\|all"):
        adapters.read_catalog("coco_captions", "train", task="asr")
    with pytest.raises(CatalogError, match="'s2s' is not one of asr, tts"):
        adapters.read_catalog("librispeech", "dev_clean", task="s2s")
    assert issubclass(CatalogError, ValueError)


# ---------------------------------------------------------------------------------------------- reading, no TF needed

def fake_records(name: str, n: int) -> list[dict]:
    """Records from TFDS's own fake-example generator (what mock_data's data_source serves) over features that
    mirror the catalog ones, declared here because the catalog builders cannot be constructed without TF."""
    features = tfds.features
    if name == "coco_captions":
        spec = features.FeaturesDict({"image": features.Image(encoding_format="jpeg"),
                                      "image/filename": features.Text(), "image/id": np.int64,
                                      "captions": features.Sequence({"text": np.str_, "id": np.int64})})
    else:  # tfds.features.Audio(dtype=int16) itself needs TF; its tensor is this one
        spec = features.FeaturesDict({"id": features.Text(), "text": features.Text(), "speaker_id": np.int64,
                                      "chapter_id": np.int64, "speech": features.Tensor(shape=(None,), dtype=np.int16)})
    from tensorflow_datasets.testing.mocking import RandomFakeGenerator

    generator = RandomFakeGenerator(spec, n)
    return [generator[i] for i in range(n)]


def test_read_catalog_on_fake_records_without_tensorflow(monkeypatch):
    opened = []

    def open_fake(name, split, data_dir, decode_images):
        opened.append((name, split))
        return fake_records(name, 3)

    monkeypatch.setattr(adapters, "open_catalog", open_fake)
    records = fake_records("coco_captions", 3)
    captions = sum(len(r["captions"]["text"]) for r in records)
    examples = list(adapters.read_catalog("coco_captions", "val", captions="all"))
    assert len(examples) == captions > 3
    assert len(list(adapters.read_catalog("coco_captions", "val"))) == 3
    assert len(list(adapters.read_catalog("coco_captions", "val", limit=4, captions="all"))) == 4
    assert list(adapters.read_catalog("coco_captions", "val", limit=0)) == []
    for example in examples:
        image = example["segments"][0]["image"]
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3
    tts = list(adapters.read_catalog("librispeech", "dev_clean", task="tts"))
    assert [e["targets"] for e in tts] == [["audio"]] * 3
    assert all(e["segments"][1]["audio"].dtype == np.float32 for e in tts)
    assert ("librispeech", "dev_clean") in opened


def test_catalog_examples_opens_both_splits_with_defaults(monkeypatch):
    opened = []
    monkeypatch.setattr(adapters, "open_catalog",
                        lambda name, split, data_dir, decode_images: opened.append(split) or fake_records(name, 2))
    examples = adapters.catalog_examples("librispeech", "", None, limit=1, task="asr")
    assert opened == ["train_clean100+train_clean360+train_other500", "dev_clean"]
    assert set(examples) == {"train", "eval"}
    assert [len(list(examples[s]())) for s in ("train", "eval")] == [1, 1]
    assert len(list(examples["train"]())) == 1  # factories can be called again
    adapters.catalog_examples("coco_captions", "train+restval", "test")
    assert opened[-2:] == ["train+restval", "test"]


@pytest.mark.skipif(HAS_TF, reason="checks the error shown where TensorFlow is not installed")
def test_read_catalog_says_tensorflow_is_missing(tmp_path):
    with pytest.raises(CatalogError, match="pip install tensorflow-cpu"):
        adapters.read_catalog("librispeech", "dev_clean", data_dir=tmp_path)
    with pytest.raises(CatalogError, match="pip install tensorflow-cpu.*none was found in"):
        adapters.read_catalog("coco_captions", "val", data_dir=tmp_path)


# ---------------------------------------------------------------------------------------------- mock_data (needs TF)

def mock_data(**kwargs):
    return tfds.testing.mock_data(num_examples=3, policy=tfds.testing.MockPolicy.USE_CODE, **kwargs)


def test_read_catalog_coco_captions_under_mock_data():
    # decode_images=True: with images left encoded (the default) mock_data must encode its random examples, and
    # it rejects its own random ones (captions/text and captions/id of different lengths, bboxes with
    # max < min). The encoded-JPEG path is tested on real files below (test_read_catalog_reads_prepared_files).
    needs_tf()
    with mock_data():
        records = [tfds.data_source("coco_captions", split="val")[i] for i in range(3)]
        firsts = list(adapters.read_catalog("coco_captions", "val", decode_images=True))
        every = list(adapters.read_catalog("coco_captions", "val", decode_images=True, captions="all"))
    assert len(firsts) == 3
    assert len(every) == sum(len(r["captions"]["text"]) for r in records)
    for record, example in zip(records, firsts, strict=True):
        assert example["id"] == f"coco_captions/{int(record['image/id'])}/0"
        np.testing.assert_array_equal(example["segments"][0]["image"], record["image"])
        assert example["segments"][1]["text"] == record["captions"]["text"][0].strip()


@pytest.mark.parametrize("task", ["asr", "tts"])
def test_read_catalog_librispeech_under_mock_data(task):
    needs_tf()
    with mock_data():
        records = [tfds.data_source("librispeech", split="dev_clean")[i] for i in range(3)]
        examples = list(adapters.read_catalog("librispeech", "dev_clean", task=task))
    assert len(examples) == 3
    for record, example in zip(records, examples, strict=True):
        audio = example["segments"][0 if task == "asr" else 1]
        assert audio["sample_rate"] == 16000
        np.testing.assert_array_equal(audio["audio"], record["speech"].astype(np.float32) / 32768)
        assert example["targets"] == (["text"] if task == "asr" else ["audio"])
        assert example["id"] == f"librispeech/{task}/{record['id']}"


def test_read_catalog_falls_back_to_tf_data_without_random_access_files(monkeypatch):
    needs_tf()

    def no_random_access(self, *args, **kwargs):
        raise NotImplementedError("tfrecord only")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)
    with mock_data(as_data_source_fn=no_random_access):
        examples = list(adapters.read_catalog("librispeech", "dev_clean", task="tts"))
    assert len(examples) == 3
    assert all(isinstance(e["segments"][0]["text"], str) for e in examples)  # bytes from tf.data, decoded


# ---------------------------------------------------------------------------------------------- real files (needs TF)

COCO_IMAGES = {100 + i: np.random.default_rng(i).integers(0, 255, (8 + i, 10, 3), dtype=np.uint8) for i in range(3)}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Tiny copies of both datasets prepared by the real catalog builders (only the sources are replaced), in
    array_record and tfrecord format: read_catalog then reads real files, as after `tfds build`."""
    needs_tf()
    from tensorflow_datasets.datasets.librispeech.librispeech_dataset_builder import Builder as Librispeech
    from tensorflow_datasets.object_detection.coco_captions import CocoCaptions

    class TinyCoco(CocoCaptions, skip_registration=True):
        name = "coco_captions"

        def _split_generators(self, dl_manager):
            return {"val": self._generate_examples()}

        def _generate_examples(self):
            no_objects = {"id": [], "area": [], "bbox": np.zeros((0, 4), np.float32), "label": [], "is_crowd": []}
            for image_id, image in COCO_IMAGES.items():
                yield image_id, {"image": image, "image/filename": f"{image_id}.jpg", "image/id": image_id,
                                 "objects": no_objects,
                                 "captions": {"text": [f"photo {image_id}", f"again {image_id}"], "id": [1, 2]}}

    class TinyLibrispeech(Librispeech, skip_registration=True):
        name = "librispeech"

        @classmethod
        def _get_pkg_dir_path(cls):
            return Librispeech._get_pkg_dir_path()

        def _split_generators(self, dl_manager):
            return {"dev_clean": self._generate_examples()}

        def _generate_examples(self):
            for i in range(3):
                yield i, {"id": f"1-2-{i}", "speaker_id": 1, "chapter_id": 2, "text": f"HELLO {i}",
                          "speech": np.full(100 + i, -32768 + i, np.int16)}

    root = tmp_path_factory.mktemp("tfds")
    for file_format in ("array_record", "tfrecord"):
        for builder in (TinyCoco, TinyLibrispeech):
            builder(data_dir=str(root / file_format), file_format=file_format).download_and_prepare()
    return root


@pytest.mark.parametrize("file_format", ["array_record", "tfrecord"])
def test_read_catalog_reads_prepared_files(prepared, file_format):
    PIL = pytest.importorskip("PIL.Image")
    data_dir = prepared / file_format
    every = {e["id"]: e for e in adapters.read_catalog("coco_captions", "val", data_dir=data_dir, captions="all")}
    assert sorted(every) == [f"coco_captions/{i}/{k}" for i in COCO_IMAGES for k in (0, 1)]
    example = every["coco_captions/101/1"]
    assert example["segments"][1] == {"text": "again 101"}
    jpeg = example["segments"][0]["image_bytes"]  # stored JPEG, not decoded
    assert np.asarray(PIL.open(io.BytesIO(jpeg))).shape == COCO_IMAGES[101].shape
    decoded = {e["id"]: e for e in adapters.read_catalog("coco_captions", "val", data_dir=data_dir, decode_images=True)}
    assert decoded["coco_captions/102/0"]["segments"][0]["image"].shape == COCO_IMAGES[102].shape

    asr = {e["id"]: e for e in adapters.read_catalog("librispeech", "dev_clean", data_dir=data_dir)}
    assert sorted(asr) == [f"librispeech/asr/1-2-{i}" for i in range(3)]
    audio, text = asr["librispeech/asr/1-2-2"]["segments"]
    assert text == {"text": "HELLO 2"}
    np.testing.assert_array_equal(audio["audio"], np.full(102, (-32768 + 2) / 32768, np.float32))
    assert len(list(adapters.read_catalog("librispeech", "dev_clean", data_dir=data_dir, limit=2))) == 2


def test_read_catalog_errors_on_real_dirs(prepared, tmp_path):
    with pytest.raises(CatalogError, match="not prepared.*tfds build coco_captions --file_format=array_record"):
        adapters.read_catalog("coco_captions", "val", data_dir=tmp_path)
    with pytest.raises(CatalogError, match="cannot open split 'train'.*prepared splits: dev_clean"):
        adapters.read_catalog("librispeech", "train", data_dir=prepared / "array_record")
    with pytest.raises(CatalogError, match="prepared splits: val"):
        adapters.catalog_examples("coco_captions", data_dir=prepared / "array_record")  # default train: absent


def test_read_catalog_opens_coco_from_its_files_when_the_catalog_code_cannot_load(prepared, monkeypatch):
    def builder_without_tf(name, **kwargs):
        raise ModuleNotFoundError("No module named 'tensorflow'", name="tensorflow")

    monkeypatch.setattr(tfds, "builder", builder_without_tf)
    monkeypatch.setattr(adapters, "_missing_tensorflow", lambda error: isinstance(error, ModuleNotFoundError))
    examples = list(adapters.read_catalog("coco_captions", "val", data_dir=prepared / "array_record"))
    assert sorted(e["id"] for e in examples) == [f"coco_captions/{i}/0" for i in COCO_IMAGES]
