"""The Parquet embeddings table: round trip, accepted variants, and every error naming its column and rows."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raymetric.embeddings import EmbeddingsError, EmbeddingsTable, read_embeddings, write_embeddings


def table(n=6, dim=3, **kwargs):
    rng = np.random.default_rng(0)
    fields = dict(embeddings=rng.normal(size=(n, dim)).astype(np.float32), labels=np.arange(n) % 2,
                  is_query=np.ones(n, bool), is_gallery=np.ones(n, bool))
    return EmbeddingsTable(**(fields | kwargs))


def test_round_trip_with_every_column(tmp_path):
    t = table(categories=np.array(list("aabbab")), sequences=np.array(["s1", None, "s1", "", "s2", None], object),
              paths=np.array([f"/img/{i}.jpg" for i in range(6)], object))
    write_embeddings(t, tmp_path / "e.parquet")
    back = read_embeddings(tmp_path / "e.parquet")
    np.testing.assert_array_equal(back.embeddings, t.embeddings)
    assert back.embeddings.dtype == np.float32 and back.labels.dtype == np.int64
    assert back.categories.tolist() == list("aabbab") and back.paths[5] == "/img/5.jpg"
    assert back.sequence_codes().tolist() == [0, -1, 0, -1, 1, -1]  # empty and null: no sequence
    schema = pq.read_schema(tmp_path / "e.parquet")
    assert pa.types.is_fixed_size_list(schema.field("embedding").type) and schema.field("embedding").type.list_size == 3
    assert back.embeddings.flags.writeable


def test_plain_list_column_and_extra_columns_are_accepted(tmp_path):
    arrow = pa.table({"embedding": [[1.0, 2.0], [3.0, 4.0]], "label": [1, 1], "is_query": [True, True],
                      "is_gallery": [True, False], "score": [0.1, 0.2]})
    pq.write_table(arrow, tmp_path / "e.parquet")
    back = read_embeddings(tmp_path / "e.parquet")
    assert back.embeddings.tolist() == [[1.0, 2.0], [3.0, 4.0]] and back.is_gallery.tolist() == [True, False]


@pytest.mark.parametrize("columns, message", [
    ({"label": [1], "is_query": [True], "is_gallery": [True]}, r"missing column\(s\) \['embedding'\]"),
    ({"embedding": [[1.0], [1.0, 2.0]], "label": [1, 1], "is_query": [True, True], "is_gallery": [True, True]},
     r"column 'embedding': rows differ in length .* 1 row\(s\): 1"),
    ({"embedding": [[1.0], None], "label": [1, 1], "is_query": [True, True], "is_gallery": [True, True]},
     r"column 'embedding': empty in 1 row\(s\): 1"),
    ({"embedding": [[1.0], [float("nan")]], "label": [1, 1], "is_query": [True, True], "is_gallery": [True, True]},
     r"column 'embedding': non-finite values .* 1 row\(s\): 1"),
    ({"embedding": [[1.0], [2.0]], "label": [1.5, 1.0], "is_query": [True, True], "is_gallery": [True, True]},
     r"column 'label': must hold integers"),
    ({"embedding": [[1.0], [2.0]], "label": [1, None], "is_query": [True, True], "is_gallery": [True, True]},
     r"column 'label': empty in 1 row\(s\): 1"),
    ({"embedding": [[1.0], [2.0]], "label": [1, 2], "is_query": [True, False], "is_gallery": [True, False]},
     r"a row is neither query nor gallery: 1 row\(s\): 1"),
    ({"embedding": [[1.0], [2.0]], "label": [1, 2], "is_query": [False, False], "is_gallery": [True, True]},
     r"column 'is_query': no row is a query"),
    ({"embedding": [[1.0], [2.0]], "label": [1, 2], "is_query": [1, 1], "is_gallery": [True, True]},
     r"column 'is_query': must be boolean"),
    ({"embedding": ["a", "b"], "label": [1, 2], "is_query": [True, True], "is_gallery": [True, True]},
     r"column 'embedding': must be a list of floats"),
])
def test_bad_tables_name_the_column_and_rows(tmp_path, columns, message):
    pq.write_table(pa.table(columns), tmp_path / "bad.parquet")
    with pytest.raises(EmbeddingsError, match=message):
        read_embeddings(tmp_path / "bad.parquet")


def test_missing_or_unreadable_file(tmp_path):
    with pytest.raises(EmbeddingsError, match="not found"):
        read_embeddings(tmp_path / "none.parquet")
    (tmp_path / "x.parquet").write_text("not parquet")
    with pytest.raises(EmbeddingsError, match="not a readable Parquet table"):
        read_embeddings(tmp_path / "x.parquet")


def test_many_bad_rows_are_counted_not_all_listed():
    emb = np.zeros((30, 2), np.float32)
    emb[::2] = np.inf
    with pytest.raises(EmbeddingsError, match=r"15 row\(s\): 0, 2, 4, 6, 8, 10, 12, 14, 16, 18 and 5 more"):
        table(n=30, dim=2, embeddings=emb).check()


@pytest.mark.parametrize("category", ["", None])
def test_an_empty_category_is_refused(tmp_path, category):
    """An empty category would be a category named "" (or "None"), and "" is the overall block's key."""
    table = pa.table({
        "embedding": pa.array([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]], pa.list_(pa.float32())),
        "label": pa.array([0, 0, 1], pa.int64()), "is_query": [True] * 3, "is_gallery": [True] * 3,
        "category": pa.array(["shoes", category, "bags"], pa.string()),
    })
    pq.write_table(table, tmp_path / "t.parquet")
    with pytest.raises(EmbeddingsError, match=r"column 'category': empty in 1 row\(s\): 1"):
        read_embeddings(tmp_path / "t.parquet")
