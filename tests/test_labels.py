"""Chest ImaGenome label reduction on a hand-written relations file (paper-reference §10.1)."""
import pandas as pd
import pytest

from ehrxdiff.data import labels as L

HEADER = "study_id\timage_id\trow_id\tsent_loc\tbbox\trelation\tlabel_name\tcategoryID\tcontext\n"
ROWS = [
    # image d1: effusion said at sentence 1 (yes) then sentence 3 (no) in the left box -> 0 there,
    # but the right box says yes at sentence 2 -> image label = max over boxes = 1
    "10\td1.dcm\t10|1\t1\tleft lung\t1\tpleural effusion\tanatomicalfinding\tyes",
    "10\td1.dcm\t10|3\t3\tleft lung\t0\tpleural effusion\tanatomicalfinding\tno",
    "10\td1.dcm\t10|2\t2\tright lung\t1\tpleural effusion\tanatomicalfinding\tyes",
    # pneumothorax: yes at sentence 1, no at sentence 4 (same box) -> last sentence wins -> 0
    "10\td1.dcm\t10|1\t1\tleft lung\t1\tpneumothorax\tanatomicalfinding\tyes",
    "10\td1.dcm\t10|4\t4\tleft lung\t0\tpneumothorax\tanatomicalfinding\tno",
    # nlp rows and unknown bbox are dropped
    "10\td1.dcm\t10|5\t5\tleft lung\t1\tabnormal\tnlp\tyes",
    "10\td1.dcm\t10|5\t5\tunknown\t1\tlung opacity\tanatomicalfinding\tyes",
    # a label outside the 10 is dropped
    "10\td1.dcm\t10|5\t5\tleft lung\t1\tatelectasis\tanatomicalfinding\tyes",
    # image d0 (earlier study): pneumothorax positive, consolidation negative
    "9\td0.dcm\t9|1\t1\tleft lung\t1\tpneumothorax\tanatomicalfinding\tyes",
    "9\td0.dcm\t9|1\t1\tleft lung\t0\tconsolidation\tanatomicalfinding\tno",
]


@pytest.fixture
def relations_file(tmp_path):
    p = tmp_path / "attribute_relations_tabular.txt"
    p.write_text(HEADER + "\n".join(ROWS) + "\n")
    return p


def test_reduction_last_sentence_max_bbox_drops(relations_file):
    lab = L.image_labels(L.read_relations(relations_file))
    got = {(r.dicom_id, r.label): r.relation for r in lab.itertuples()}
    assert got == {("d1", "pleural effusion"): 1, ("d1", "pneumothorax"): 0,
                   ("d0", "pneumothorax"): 1, ("d0", "consolidation"): 0}


def test_sent_loc_recomputed_from_row_id(tmp_path, relations_file):
    df = pd.read_csv(relations_file, sep="\t").drop(columns="sent_loc")
    p = tmp_path / "no_sent_loc.txt"
    df.to_csv(p, sep="\t", index=False)
    rel = L.read_relations(p)
    assert rel["sent_loc"].max() == 5.0
    assert len(L.image_labels(rel)) == 4


def test_missing_column_names_file_and_column(tmp_path, relations_file):
    df = pd.read_csv(relations_file, sep="\t").drop(columns="bbox")
    p = tmp_path / "bad.txt"
    df.to_csv(p, sep="\t", index=False)
    with pytest.raises(ValueError, match=r"bad\.txt.*bbox"):
        L.read_relations(p)


def test_pair_rows_missing_prev_label_is_zero(relations_file):
    lab = L.image_labels(L.read_relations(relations_file))
    pairs = pd.DataFrame({"pair_key": ["d1_d0"], "prev_dicom_id": ["d0"], "target_dicom_id": ["d1"],
                          "split": ["test"]})
    rows = L.pair_label_rows(pairs, lab).set_index("label")
    assert list(rows.index) == ["pleural effusion", "pneumothorax"]       # target labels only
    assert rows.loc["pleural effusion", "prev_relation"] == 0             # not mentioned before -> 0
    assert rows.loc["pneumothorax", ["relation", "prev_relation"]].tolist() == [0, 1]
    prev = L.prev_label_matrix(rows.reset_index())
    assert prev.loc["d1_d0", "pneumothorax"] == 1 and prev.loc["d1_d0", "consolidation"] == 0
    trg = L.target_label_matrix(rows.reset_index())
    assert trg.loc["d1_d0", "pleural effusion"] == 1 and pd.isna(trg.loc["d1_d0", "consolidation"])


def test_label_matrix_nan_for_unmentioned(relations_file):
    wide = L.label_matrix(L.image_labels(L.read_relations(relations_file)))
    assert wide.loc["d1", "pleural effusion"] == 1 and pd.isna(wide.loc["d1", "lung opacity"])
    assert list(wide.columns) == list(L.IMAGENOME_LABELS)
