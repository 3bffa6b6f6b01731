"""Paper constants in one place, each with the section of the paper (or the reference code) it comes from.

[P §x] = Kyung et al., "Towards Predicting Temporal Changes in a Patient's Chest X-ray Images based on
Electronic Health Records"; [R] = the released code, as summarised in shared/docs/paper-reference.md.
Profiles (configs/*.yaml) may shrink sizes for CPU runs; these are the paper's values. This is their one home:
``config.StudyConfig``'s defaults for the data steps are these names, and ``configs/paper.yaml`` is checked
against them (``tests/test_config.py::test_paper_profile_is_the_papers_numbers``).
"""

# --- Data (§II-D, §III-A, paper-reference §2) --------------------------------------------------
MIN_AGE = 18                    # adults only [R mimiciv_filtering.py, --min_age 18]
FRONTAL_VIEWS = ("PA", "AP")    # frontal images only [R §2.2]
MAX_INTERVAL_HOURS = 48         # target - prev < 48 h [P §II-D]: "≈80 % of consecutive CXRs within 2 days"
MAX_EVENTS = 1024               # most recent events kept per pair [R --max_event_size]
SPLIT_SEED = 42                 # patient-level split seed [R ehr.py make_input]
TEST_FRACTION = 0.05            # first 5 % of cumulative samples -> test [R --valid-percent 0.05]
VALID_FRACTION = 0.05           # next 5 % -> valid
EVENT_TABLES = (                # the seven event tables [R mimiciv_filtering.py self.tables]
    "labevents", "prescriptions", "inputevents", "chartevents",
    "outputevents", "microbiologyevents", "procedureevents",
)
NUMBER_DECIMALS = 4             # numbers rounded to 4 decimals in event text [R ehr.py]

# The 10 Chest ImaGenome evaluation labels [P §III-A], [R convert_to_reference_dataset.py USED_ATTRS]
IMAGENOME_LABELS = (
    "pleural effusion", "enlarged cardiac silhouette", "lung opacity",
    "pulmonary edema/hazy opacity", "pneumonia", "consolidation", "vascular congestion",
    "pneumothorax", "enlarged hilum", "mediastinal widening",
)

# --- Model (§II-B, §III-A, Fig. 2-3) -----------------------------------------------------------
IMAGE_SIZE = 256                # I_prev / I_trg resolution [P §III-A]
LATENT_CHANNELS = 3             # C_z: Cheff KL-VAE latent channels [R configs]
VAE_DOWNSAMPLE = 4              # f = 4 -> H_f = W_f = 64 [R configs, Cheff]
LATENT_SCALE = 0.18215          # scale_factor [R configs]
D_CLIP = 768                    # CLIP width = UNet context_dim [P §III-A]
N_IMAGE_TOKENS = 65             # ViT-B/32 at 256 px: 8x8 patches + CLS [R VisualTransformer]
C_FUSION = 1024                 # fused context tokens [R condition_feat_dim]
TABLE_LAYERS, TABLE_HEADS = 2, 24   # table transformer [R TabTransformerEmbedder]

# Table IV rows: adaptor variant → (VAE conditioning "concat" | "xattn" | None, CLIP image, CLIP table)
TABLE_IV_VARIANTS = {
    "concat-VAE": ("concat", False, False),
    "xattn-VAE": ("xattn", False, False),
    "xattn-CLIPimg": (None, True, False),
    "xattn-CLIPtab": (None, False, True),
    "concat-VAE+CLIPtab": ("concat", False, True),
    "concat-VAE+CLIPimg+CLIPtab": ("concat", True, True),
    "xattn-VAE+CLIPimg+CLIPtab": ("xattn", True, True),  # row 7: the final EHRXDiff
}
FINAL_VARIANT = "xattn-VAE+CLIPimg+CLIPtab"                   # Table IV row 7 = EHRXDiff
MAIN_MODELS = {"EHRXDiff": False, "EHRXDiff_w_null": True}   # the paper's two models: name → with the §II-D null samples

# --- Diffusion (§II-C, Eq. 2) ------------------------------------------------------------------
NUM_TRAIN_TIMESTEPS = 1000
BETA_START, BETA_END = 0.0015, 0.0295   # sqrt-linear ("scaled_linear" in diffusers) [R configs]
UNET_BASE_CHANNELS = 224
UNET_CHANNEL_MULT = (1, 2, 4, 4)
UNET_HEADS = 8
LDM_LR = 5e-5                   # AdamW, constant [R configs]
EFFECTIVE_BATCH = 128           # 8 x 2 GPU x accumulate 8 [R configs]
EMA_DECAY = 0.9999
DDIM_STEPS, DDIM_ETA = 100, 1.0  # sampling [R scripts/eval.py]; no classifier-free guidance

# --- CLIP pre-training (§II-B, §III-A) ---------------------------------------------------------
CLIP_LR, CLIP_WD = 5e-4, 0.2
CLIP_BETAS, CLIP_EPS = (0.9, 0.98), 1e-6
CLIP_BATCH = 1024


# --- What-if interventions (notebook 07, beyond the paper: §V's "clinical simulation tool") -------------
# The built-in interventions a what-if can add: the rows the synthetic world writes when the clinician acts
# (events_emit.py), the world action they stand for (dynamics.ACTIONS), and the findings medicine (and the world)
# says they lower. MIMIC-shaped, so used on the synthetic world and MIMIC only: an own cohort's tables hold no
# prescriptions/inputevents rows, and it defines its own in the config's ``whatif_definitions``.
# Plain crystalloid boluses are not in the list: the reference's inputevents filter (D2) drops them, so the
# model never sees one and a what-if with them could only test the filter.
WHATIF_INTERVENTIONS: dict[str, dict] = {
    "diuretic": {
        "events": [("prescriptions", {"drug_type": "MAIN", "drug": "Furosemide", "dose_val_rx": "40",
                                      "dose_unit_rx": "mg", "form_val_disp": "40", "form_unit_disp": "mg",
                                      "route": "IV"}),
                   ("inputevents", {"itemid": "Furosemide (Lasix)", "amount": 40, "amountuom": "mg",
                                    "ordercategoryname": "05-Med Bolus",
                                    "ordercomponenttypedescription": "Main order parameter",
                                    "ordercategorydescription": "Drug Push", "isopenbag": 0,
                                    "originalamount": 40, "originalrate": 0})],
        "action": {"furosemide_mg": 40.0},
        "lowers": ("pulmonary edema/hazy opacity", "pleural effusion"),
    },
    "antibiotic": {
        "events": [("prescriptions", {"drug_type": "MAIN", "drug": "Vancomycin", "dose_val_rx": "1",
                                      "dose_unit_rx": "g", "form_val_disp": "1", "form_unit_disp": "g",
                                      "route": "IV"}),
                   ("inputevents", {"itemid": "Vancomycin", "amount": 1, "amountuom": "dose",
                                    "ordercategoryname": "08-Antibiotics (IV)",
                                    "secondaryordercategoryname": "02-Fluids (Crystalloids)",
                                    "ordercomponenttypedescription": "Main order parameter",
                                    "ordercategorydescription": "Drug Push", "totalamount": 100,
                                    "totalamountuom": "ml", "isopenbag": 0, "originalamount": 1,
                                    "originalrate": 0})],
        "action": {"antibiotic_start": 120.0},
        "lowers": ("consolidation", "pneumonia"),
    },
    "intubation": {
        "events": [("procedureevents", {"itemid": "Intubation", "value": 1, "valueuom": "None",
                                        "ordercategoryname": "Intubation/Extubation",
                                        "ordercategorydescription": "Task", "isopenbag": 0, "originalamount": 1,
                                        "originalrate": 0})],
        "action": {"intubate": 1.0},
        "lowers": (),          # adds tubes; the evaluator scores no devices
    },
}
WHATIF_DEFAULT = ("diuretic", "antibiotic")   # run by default on MIMIC-shaped data (intubation lowers no finding)
