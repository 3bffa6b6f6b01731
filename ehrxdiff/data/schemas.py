"""The real releases' files and their ordered columns (shared/docs/mimic-schemas.md).

One source of truth for both sides of the study: the synthetic world writes exactly these headers, and
the extraction code validates real downloads against them (by name; order is only enforced for the
synthetic world's tests). Keys are release-relative stems:

- ``hosp/<table>``, ``icu/<table>``     MIMIC-IV v2.2 (``<root>/mimiciv/2.2/``), ``.csv.gz`` or ``.csv``
- ``cxr/metadata|split|chexpert``       MIMIC-CXR-JPG v2.0.0 root files ``mimic-cxr-2.0.0-<name>.csv.gz``
- ``imagenome/attribute_relations``     Chest ImaGenome silver ``scene_tabular/attribute_relations_tabular.txt``

Marks follow the schema doc: the MIMIC-IV orders are verified against the v2.2 DDL and the demo headers;
the CXR split order and the ImaGenome column order are unverified there (read by name).
"""
from __future__ import annotations

# Release roots below a data directory, as a PhysioNet download lays them out.
MIMIC_IV_SUBDIR = "mimiciv/2.2"
MIMIC_CXR_SUBDIR = "mimic-cxr-jpg/2.0.0"
IMAGENOME_SUBDIR = "chest-imagenome/1.0.0"

COLUMNS: dict[str, tuple[str, ...]] = {
    # ---- MIMIC-IV v2.2 hosp (mimic-schemas §1.3) ----
    "hosp/patients": ("subject_id", "gender", "anchor_age", "anchor_year", "anchor_year_group", "dod"),
    "hosp/admissions": (
        "subject_id", "hadm_id", "admittime", "dischtime", "deathtime", "admission_type",
        "admit_provider_id", "admission_location", "discharge_location", "insurance", "language",
        "marital_status", "race", "edregtime", "edouttime", "hospital_expire_flag",
    ),
    "hosp/d_labitems": ("itemid", "label", "fluid", "category"),
    "hosp/labevents": (
        "labevent_id", "subject_id", "hadm_id", "specimen_id", "itemid", "order_provider_id",
        "charttime", "storetime", "value", "valuenum", "valueuom", "ref_range_lower",
        "ref_range_upper", "flag", "priority", "comments",
    ),
    "hosp/prescriptions": (
        "subject_id", "hadm_id", "pharmacy_id", "poe_id", "poe_seq", "order_provider_id",
        "starttime", "stoptime", "drug_type", "drug", "formulary_drug_cd", "gsn", "ndc",
        "prod_strength", "form_rx", "dose_val_rx", "dose_unit_rx", "form_val_disp",
        "form_unit_disp", "doses_per_24_hrs", "route",
    ),
    "hosp/microbiologyevents": (
        "microevent_id", "subject_id", "hadm_id", "micro_specimen_id", "order_provider_id",
        "chartdate", "charttime", "spec_itemid", "spec_type_desc", "test_seq", "storedate",
        "storetime", "test_itemid", "test_name", "org_itemid", "org_name", "isolate_num",
        "quantity", "ab_itemid", "ab_name", "dilution_text", "dilution_comparison",
        "dilution_value", "interpretation", "comments",
    ),
    # ---- MIMIC-IV v2.2 icu ----
    "icu/icustays": (
        "subject_id", "hadm_id", "stay_id", "first_careunit", "last_careunit", "intime",
        "outtime", "los",
    ),
    "icu/d_items": (
        "itemid", "label", "abbreviation", "linksto", "category", "unitname", "param_type",
        "lownormalvalue", "highnormalvalue",
    ),
    "icu/chartevents": (
        "subject_id", "hadm_id", "stay_id", "caregiver_id", "charttime", "storetime", "itemid",
        "value", "valuenum", "valueuom", "warning",
    ),
    "icu/inputevents": (
        "subject_id", "hadm_id", "stay_id", "caregiver_id", "starttime", "endtime", "storetime",
        "itemid", "amount", "amountuom", "rate", "rateuom", "orderid", "linkorderid",
        "ordercategoryname", "secondaryordercategoryname", "ordercomponenttypedescription",
        "ordercategorydescription", "patientweight", "totalamount", "totalamountuom",
        "isopenbag", "continueinnextdept", "statusdescription", "originalamount",
        "originalrate",
    ),
    "icu/outputevents": (
        "subject_id", "hadm_id", "stay_id", "caregiver_id", "charttime", "storetime", "itemid",
        "value", "valueuom",
    ),
    # v2.2 writes the last two headers in upper case (mimic-schemas §1.3): readers lower-case headers.
    "icu/procedureevents": (
        "subject_id", "hadm_id", "stay_id", "caregiver_id", "starttime", "endtime", "storetime",
        "itemid", "value", "valueuom", "location", "locationcategory", "orderid", "linkorderid",
        "ordercategoryname", "ordercategorydescription", "patientweight", "isopenbag",
        "continueinnextdept", "statusdescription", "ORIGINALAMOUNT", "ORIGINALRATE",
    ),
    # ---- MIMIC-CXR-JPG v2.0.0 (mimic-schemas §2) ----
    "cxr/metadata": (
        "dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition",
        "Rows", "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
        "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning",
    ),
    "cxr/split": ("dicom_id", "study_id", "subject_id", "split"),
    "cxr/chexpert": (
        "subject_id", "study_id", "Atelectasis", "Cardiomegaly", "Consolidation", "Edema",
        "Enlarged Cardiomediastinum", "Fracture", "Lung Lesion", "Lung Opacity", "No Finding",
        "Pleural Effusion", "Pleural Other", "Pneumonia", "Pneumothorax", "Support Devices",
    ),
    # ---- Chest ImaGenome v1.0.0 silver scene_tabular (mimic-schemas §3.2; order unverified) ----
    "imagenome/attribute_relations": (
        "study_id", "image_id", "row_id", "sent_loc", "bbox", "relation", "label_name",
        "categoryID", "context",
    ),
}

# The time column of each event table [R mimiciv_filtering.py], via reference-item-filters.json.
TIME_COLUMNS = {
    "labevents": "charttime", "prescriptions": "starttime", "inputevents": "starttime",
    "chartevents": "charttime", "outputevents": "charttime", "microbiologyevents": "charttime",
    "procedureevents": "starttime",
}

# Which module each event table lives in.
EVENT_TABLE_MODULE = {
    "labevents": "hosp", "prescriptions": "hosp", "microbiologyevents": "hosp",
    "inputevents": "icu", "chartevents": "icu", "outputevents": "icu", "procedureevents": "icu",
}

CXR_FILES = {
    "cxr/metadata": "mimic-cxr-2.0.0-metadata.csv.gz",
    "cxr/split": "mimic-cxr-2.0.0-split.csv.gz",
    "cxr/chexpert": "mimic-cxr-2.0.0-chexpert.csv.gz",
}
IMAGENOME_RELATIONS = "silver_dataset/scene_tabular/attribute_relations_tabular.txt"


def cxr_image_relpath(subject_id: int, study_id: int, dicom_id: str) -> str:
    """``files/p<first 2 digits>/p<subject>/s<study>/<dicom>.jpg`` (mimic-schemas §2.1)."""
    s = str(int(subject_id))
    return f"files/p{s[:2]}/p{s}/s{int(study_id)}/{dicom_id}.jpg"
