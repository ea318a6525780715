"""Compositional synthetic report triplets: a TRAINING family that teaches clinical equivalence.

Rule-based rewrites of real reports (`augment.variants`) can only move words around what a report already
says. Here a report is first a *clinical state* (a list of `Statement`s: findings present or absent, with
side, severity, size, change over time; devices with side and tip position) and only then text:

* the anchor and the positive are two independent realizations of the SAME state (other synonyms, other
  sentence templates, another sentence order, absent findings listed together or apart);
* the hard negative changes ONE clinical attribute of ONE statement (presence, side, severity or size,
  change over time, device position or removal, or a new finding in a normal report) and is realized with
  the anchor's own word choices, so it is lexically closer to the anchor than the positive is.

A model can then only rank the positive first by reading the clinical content rather than counting shared
words. Every phrase table below lists wordings that radiologists use interchangeably for the same finding;
anything clinically different sits in a different table entry.

This is a training family ("synthetic_compositional"). It shares no code or word lists with the held-out
evaluation families (`evaluation.heldout_variants`) or the clinical ordering suite, and must never be
used to evaluate a model trained on it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

FAMILY = "synthetic_compositional"

# ----------------------------------------------------------------------------------------------- vocabulary
# Locations: key -> (side, wordings usable after "in the"/as a modifier). Mirror images swap the side.
LOCATIONS = {
    "rul": ("right", ("right upper lobe", "RUL")),
    "rml": ("right", ("right middle lobe", "RML")),
    "rll": ("right", ("right lower lobe", "RLL")),
    "lul": ("left", ("left upper lobe", "LUL")),
    "lingula": ("left", ("lingula",)),
    "lll": ("left", ("left lower lobe", "LLL")),
    "right_base": ("right", ("right lung base", "right base")),
    "left_base": ("left", ("left lung base", "left base")),
    "bibasilar": ("bilateral", ("lung bases bilaterally", "both lung bases")),
}
MIRROR = {"rul": "lul", "lul": "rul", "rml": "lingula", "lingula": "rml", "rll": "lll", "lll": "rll",
          "right_base": "left_base", "left_base": "right_base"}

SIZE_WORDS = {"small": ("small",), "moderate": ("moderate", "moderate-sized"), "large": ("large",)}
DEGREE_WORDS = {"mild": ("mild",), "moderate": ("moderate",), "severe": ("severe", "marked")}
DEGREE_ADVERBS = {"mild": ("mildly",), "moderate": ("moderately",), "severe": ("markedly", "severely")}


@dataclass(frozen=True)
class Finding:
    """How one kind of finding is written. `names`: interchangeable nouns (singular); `plural`: the noun for
    bilateral findings; `sided`: takes left/right/bilateral; `located`: takes a lung location; `scale`:
    "size" (small..large), "degree" (mild..severe) or None; `absent`: wordings of its absence."""

    names: tuple[str, ...]
    absent: tuple[str, ...]
    plural: str | None = None
    sided: bool = False
    located: bool = False
    scale: str | None = None


FINDINGS = {
    "effusion": Finding(("pleural effusion",), ("No pleural effusion.", "No evidence of pleural effusion.",
                        "There is no pleural effusion.", "No pleural effusion is seen."),
                        plural="pleural effusions", sided=True, scale="size"),
    "pneumothorax": Finding(("pneumothorax", "PTX"), ("No pneumothorax.", "There is no pneumothorax.",
                            "No evidence of pneumothorax.", "No pneumothorax is identified."),
                            plural="pneumothoraces", sided=True, scale="size"),
    "consolidation": Finding(("consolidation", "airspace consolidation"), ("No focal consolidation.",
                             "No focal airspace consolidation.", "There is no focal consolidation."),
                             located=True),
    "opacity": Finding(("opacity", "airspace opacity"), ("No focal airspace opacity.", "No focal opacity.",
                       "There is no focal airspace opacity."), located=True),
    "atelectasis": Finding(("atelectasis",), ("No atelectasis.", "There is no atelectasis."),
                           located=True, scale="degree"),
    "edema": Finding(("pulmonary edema", "edema"), ("No pulmonary edema.", "No edema.",
                     "No evidence of pulmonary edema.", "There is no pulmonary edema."), scale="degree"),
    "congestion": Finding(("pulmonary vascular congestion", "vascular congestion"),
                          ("No pulmonary vascular congestion.", "No vascular congestion."), scale="degree"),
    "pneumonia": Finding(("pneumonia",), ("No pneumonia.", "No evidence of pneumonia.",
                         "No focal consolidation to suggest pneumonia."), located=True),
    "nodule": Finding(("nodule", "pulmonary nodule"), ("No pulmonary nodules.", "No suspicious pulmonary nodule.",
                      "No nodules are seen."), located=True, scale="measure"),
    "cardiomegaly": Finding(("cardiomegaly", "enlargement of the cardiac silhouette"),
                            ("Heart size is normal.", "Normal heart size.", "The heart is normal in size.",
                             "The cardiac silhouette is normal in size.", "No cardiomegaly.",
                             "Heart size is within normal limits."), scale="degree"),
    "hernia": Finding(("hiatal hernia", "hiatus hernia"), ("No hiatal hernia.",), scale="size"),
    "emphysema": Finding(("emphysema", "emphysematous change"), ("No emphysema.",), scale="degree"),
    "fracture": Finding(("rib fracture",), ("No rib fracture.", "No acute rib fracture.",
                        "No displaced rib fracture."), plural="rib fractures", sided=True),
    # Further findings of chest reports, so that negation, side, size and change are learned across many nouns.
    "mass": Finding(("mass", "pulmonary mass"), ("No pulmonary mass.", "No mass is seen."), located=True,
                    scale="measure"),
    "infiltrate": Finding(("infiltrate", "airspace disease"), ("No infiltrate.", "No airspace disease.",
                          "No focal infiltrate."), located=True),
    "interstitial": Finding(("interstitial opacities", "interstitial markings"), ("No interstitial abnormality.",
                            "Interstitial markings are normal."), scale="degree"),
    "thickening": Finding(("pleural thickening",), ("No pleural thickening.",), plural="pleural thickening",
                          sided=True, scale="degree"),
    "hilar": Finding(("hilar lymphadenopathy", "hilar adenopathy"), ("No hilar lymphadenopathy.",
                     "The hila are normal."), plural="hilar lymphadenopathy", sided=True),
    "hemidiaphragm": Finding(("elevation of the hemidiaphragm", "elevated hemidiaphragm"),
                             ("The hemidiaphragms are normal in position.", "No elevation of the hemidiaphragms."),
                             sided=True, scale="degree"),
    "mediastinum_wide": Finding(("widening of the mediastinum", "mediastinal widening"),
                                ("The mediastinum is not widened.", "No mediastinal widening."), scale="degree"),
    "hyperinflation": Finding(("hyperinflation", "hyperexpansion of the lungs"), ("No hyperinflation.",
                              "The lungs are not hyperinflated."), scale="degree"),
    "scarring": Finding(("scarring", "fibrotic change"), ("No scarring.",), located=True, scale="degree"),
    "granuloma": Finding(("calcified granuloma", "granuloma"), ("No calcified granulomas.",), located=True),
    "blunting": Finding(("blunting of the costophrenic angle", "costophrenic angle blunting"),
                        ("The costophrenic angles are sharp.", "No blunting of the costophrenic angles."),
                        plural="blunting of the costophrenic angles", sided=True),
}

# Normal boilerplate that is always "absent" (a clinical state that is simply normal), with its wordings.
NORMAL_STATEMENTS = {
    "lungs_clear": ("The lungs are clear.", "Lungs are clear.", "Clear lungs.", "The lungs are clear bilaterally."),
    "mediastinum": ("Mediastinal contours are normal.", "The mediastinal contours are within normal limits.",
                    "Normal mediastinal contours.", "The mediastinal silhouette is unremarkable."),
    "bones": ("No acute osseous abnormality.", "No acute bony abnormality.", "Osseous structures are intact.",
              "The visualized osseous structures are unremarkable."),
    "vasculature": ("Pulmonary vasculature is normal.", "Normal pulmonary vascularity.",
                    "Pulmonary vascularity is within normal limits."),
}
NORMAL_SUMMARIES = ("No acute cardiopulmonary abnormality.", "No acute cardiopulmonary process.",
                    "No acute cardiopulmonary disease.", "Normal chest radiograph.", "No acute findings in the chest.")

# Devices: names, the sides they take, and tip positions (key -> interchangeable wordings).
TIP_POSITIONS = {
    "carina_good": ("4 cm above the carina", "approximately 4 cm above the carina", "40 mm above the carina"),
    "carina_low": ("at the carina", "at the level of the carina"),
    "mainstem": ("in the right mainstem bronchus", "within the right mainstem bronchus"),
    "stomach": ("in the stomach", "below the diaphragm in the stomach", "within the stomach"),
    "esophagus": ("in the distal esophagus", "within the distal esophagus"),
    "duodenum": ("in the duodenum", "within the proximal duodenum"),
    "svc": ("in the superior vena cava", "in the SVC", "within the SVC"),
    "cavoatrial": ("at the cavoatrial junction", "at the junction of the SVC and right atrium",
                   "at the caval-atrial junction"),
    "atrium": ("in the right atrium", "within the right atrium"),
    "ij_vein": ("in the internal jugular vein", "within the internal jugular vein"),
    "axillary": ("in the axillary vein", "within the axillary vein"),
}


@dataclass(frozen=True)
class Device:
    names: tuple[str, ...]
    tips: tuple[str, ...]  # possible tip-position keys; a mutation moves to another one of these
    sided: bool = False
    side_phrases: tuple[str, ...] = ("{side}", "{side}-sided")


DEVICES = {
    "ett": Device(("endotracheal tube", "ET tube", "ETT"), ("carina_good", "carina_low", "mainstem")),
    "ng": Device(("nasogastric tube", "NG tube"), ("stomach", "esophagus")),
    "feeding": Device(("feeding tube", "enteric feeding tube"), ("stomach", "duodenum", "esophagus")),
    "cvc": Device(("internal jugular central venous catheter", "IJ central line", "internal jugular CVC"),
                  ("svc", "cavoatrial", "atrium", "ij_vein"), sided=True, side_phrases=("{side}",)),
    "picc": Device(("PICC", "PICC line", "peripherally inserted central catheter"),
                   ("svc", "cavoatrial", "atrium", "axillary"), sided=True,
                   side_phrases=("{side}", "{side} upper extremity", "{side} arm")),
    "chest_tube": Device(("chest tube", "thoracostomy tube", "pleural drainage catheter"), (), sided=True),
    "pacemaker": Device(("pacemaker", "cardiac pacemaker", "pacer"), (), sided=True,
                        side_phrases=("{side}-sided", "{side} chest wall")),
}

# Change over time. Each state is written as a modifier before the noun phrase ({np}) or as a predicate after it
# ({NP}: the phrase capitalised at the start of the sentence); "persistent" (still there) and "resolved" (gone
# since the prior study) are states of their own, opposite to each other.
CHANGE_WORDS = {
    "new": ("new {np}", "interval development of {np}", "newly seen {np}", "{NP} is new",
            "{NP}, new since the prior study", "{NP} has developed since the prior examination"),
    "unchanged": ("unchanged {np}", "stable {np}", "{np}, unchanged from prior", "{NP} is unchanged",
                  "{NP} is stable", "no change in {np}", "{NP} is unchanged compared with the prior study"),
    "increased": ("increased {np}", "interval increase in {np}", "worsening {np}", "{NP} has increased",
                  "{NP} has worsened", "{NP} is larger than on the prior study", "{NP} has progressed",
                  "progression of {np}"),
    "decreased": ("decreased {np}", "interval decrease in {np}", "improving {np}", "{NP} has decreased",
                  "{NP} has improved", "{NP} is smaller than on the prior study", "interval improvement of {np}",
                  "{NP} is improving"),
    "persistent": ("persistent {np}", "{NP} persists", "{NP} is again seen", "{NP} remains",
                   "{NP} is still present"),
    "resolved": ("interval resolution of {np}", "{NP} has resolved", "previously seen {np} has cleared",
                 "{NP} is no longer seen", "resolved {np}", "{NP} has cleared since the prior study"),
}
DEVICE_CHANGE_WORDS = {
    "new": ("interval placement of {np}", "newly placed {np}", "new {np}", "{np} has been placed"),
    "unchanged": ("unchanged {np}", "stable position of {np}", "{np} in unchanged position", "{np} is unchanged"),
}
OPPOSITE_CHANGE = {"new": "unchanged", "unchanged": "new", "increased": "decreased", "decreased": "increased",
                   "persistent": "resolved", "resolved": "persistent"}


@dataclass(frozen=True)
class Statement:
    """One clinical statement of a report's state."""

    kind: str  # "finding", "device" or "normal"
    name: str
    present: bool = True
    side: str | None = None  # left / right / bilateral
    location: str | None = None  # a LOCATIONS key
    grade: str | None = None  # a SIZE_WORDS or DEGREE_WORDS key
    measure_mm: float | None = None  # nodules
    change: str | None = None  # a CHANGE_WORDS key
    tip: str | None = None  # a TIP_POSITIONS key
    removed: bool = False


# --------------------------------------------------------------------------------------------- realization
def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def _article(noun_phrase: str) -> str:
    first = noun_phrase.split(" ", 1)[0]
    if first.isupper() and first[:1] in "AEFHILMNORSX":  # "an RLL opacity", "an ETT"
        return "an"
    return "an" if noun_phrase[:1].lower() in "aeiou" else "a"


def _measure(millimetres: float, rng: random.Random) -> str:
    if millimetres >= 10 and rng.random() < 0.5:
        centimetres = millimetres / 10
        return f"{centimetres:g} cm"
    return f"{millimetres:g} mm"


def _finding_phrase(statement: Statement, rng: random.Random) -> tuple[str, bool]:
    """(noun phrase, plural) of a present finding, with its severity, side and location."""
    finding = FINDINGS[statement.name]
    plural = statement.side == "bilateral" and finding.plural is not None
    noun = finding.plural if plural else rng.choice(finding.names)
    modifiers = []
    if statement.grade is not None:
        modifiers.append(rng.choice((SIZE_WORDS if finding.scale == "size" else DEGREE_WORDS)[statement.grade]))
    if statement.measure_mm is not None:
        modifiers.append(_measure(statement.measure_mm, rng))
    location = ""
    if statement.side is not None and finding.sided:
        if statement.side == "bilateral":
            modifiers.append("bilateral")
        elif rng.random() < 0.7:
            modifiers.append(rng.choice((statement.side, f"{statement.side}-sided")))
        else:
            location = f" on the {statement.side}"
    if statement.location is not None:
        wording = rng.choice(LOCATIONS[statement.location][1])
        if statement.location == "bibasilar":
            location = f" at {'' if wording.startswith('both') else 'the '}{wording}" if rng.random() < 0.5 else ""
            if not location:
                modifiers.append("bibasilar")
        elif rng.random() < 0.5 and not wording.endswith("base"):
            modifiers.append(wording)
        else:
            location = f" in the {wording}"
    return " ".join([*modifiers, noun]) + location, plural


# Ways of stating that a finding is absent, beside each finding's own wordings.
ABSENT_TEMPLATES = ("No {name}.", "There is no {name}.", "No evidence of {name}.", "No {name} is seen.",
                    "{Name} is not seen.", "{Name} is not identified.", "Negative for {name}.",
                    "No radiographic evidence of {name}.")

# Uncountable findings take no article ("There is pulmonary edema").
MASS_NOUNS = frozenset({"edema", "congestion", "atelectasis", "consolidation", "emphysema", "pneumonia", "change",
                        "disease", "lymphadenopathy", "adenopathy", "thickening", "scarring", "hyperinflation",
                        "widening", "blunting", "markings", "opacities", "lungs", "hemidiaphragm", "mediastinum",
                        "angle", "angles"})


def _present_sentence(noun_phrase: str, plural: bool, rng: random.Random) -> str:
    be = "are" if plural else "is"
    mass = noun_phrase.rsplit(" ", 1)[-1] in MASS_NOUNS or " in the " in noun_phrase and noun_phrase.split(
        " in the ")[0].rsplit(" ", 1)[-1] in MASS_NOUNS
    article = "" if plural or mass else _article(noun_phrase) + " "
    templates = (
        f"{_capitalize(noun_phrase)}.",
        f"There {be} {article}{noun_phrase}.",
        f"{_capitalize(noun_phrase)} {be} present.",
        f"{_capitalize(noun_phrase)} {be} seen.",
    )
    return rng.choice(templates)


def _realize_finding(statement: Statement, rng: random.Random) -> str:
    finding = FINDINGS[statement.name]
    if not statement.present:
        if rng.random() < 0.5:
            return rng.choice(finding.absent)
        name = rng.choice(finding.names)
        return rng.choice(ABSENT_TEMPLATES).format(name=name, Name=_capitalize(name))
    if statement.name == "cardiomegaly" and statement.change is None and rng.random() < 0.4:
        adverb = rng.choice(DEGREE_ADVERBS[statement.grade]) + " " if statement.grade else ""
        subject = rng.choice(("The heart is", "The cardiac silhouette is", "Heart size is"))
        return f"{subject} {adverb}enlarged."
    noun_phrase, plural = _finding_phrase(statement, rng)
    if statement.change is not None:
        template = rng.choice(CHANGE_WORDS[statement.change])
        if plural:  # "bilateral pleural effusions have increased"
            template = template.replace("{NP} is ", "{NP} are ").replace("{NP} has ", "{NP} have ")
            template = template.replace("{NP} persists", "{NP} persist").replace("{NP} remains", "{NP} remain")
        return _capitalize(template.format(np=noun_phrase, NP=_capitalize(noun_phrase))) + "."
    return _present_sentence(noun_phrase, plural, rng)


def _realize_device(statement: Statement, rng: random.Random) -> str:
    device = DEVICES[statement.name]
    name = rng.choice(device.names)
    if statement.side is not None:
        name = rng.choice(device.side_phrases).format(side=statement.side) + " " + name
    if statement.removed:
        return rng.choice((f"The {name} has been removed.", f"Interval removal of the {name}.",
                           f"{_capitalize(name)} has been removed."))
    if statement.change is not None:
        subject = rng.choice(DEVICE_CHANGE_WORDS[statement.change]).format(np=name)
        if subject.endswith((" placed", " is unchanged")):  # a predicate form is a sentence of its own
            where = f" The tip is {rng.choice(TIP_POSITIONS[statement.tip])}." if statement.tip else ""
            return _capitalize(subject) + "." + where
    else:
        subject = rng.choice((f"{name}", f"the {name}", f"{_article(name)} {name}"))
    if statement.tip is None:
        if statement.change is not None:
            return _capitalize(subject) + "."
        return _capitalize(
            rng.choice((f"{subject} in place.", f"{subject} is in place.", f"{subject} remains in place."))
        )
    where = rng.choice(TIP_POSITIONS[statement.tip])
    verbs = (f"{subject} terminates {where}.", f"{subject} ends {where}.", f"The tip of {subject} is {where}.") \
        if subject.startswith(("the ", "a ", "an ")) else (f"{subject} with its tip {where}.",)
    return _capitalize(rng.choice((f"{subject} with tip {where}.", f"{subject}, tip {where}.", *verbs)))


def _realize_statement(statement: Statement, rng: random.Random) -> str:
    if statement.kind == "normal":
        return rng.choice(NORMAL_STATEMENTS[statement.name])
    if statement.kind == "device":
        return _realize_device(statement, rng)
    return _realize_finding(statement, rng)


def realize(state: list[Statement], style: int, order_seed: int, summarize_normal: bool = False) -> str:
    """The report text of `state`. `style` fixes every word choice per statement (the same style on a mutated
    state changes only the mutated statement's words); `order_seed` fixes the sentence order and whether
    absent findings are listed in one sentence."""
    order_rng = random.Random(order_seed)
    if summarize_normal and all(not s.present or s.kind == "normal" for s in state):
        return order_rng.choice(NORMAL_SUMMARIES)
    sentences = [_realize_statement(s, random.Random(f"{style}:{s.kind}:{s.name}")) for s in state]
    absent = [i for i, s in enumerate(state) if s.kind == "finding" and not s.present]
    if len(absent) >= 2 and order_rng.random() < 0.4:
        # "No pleural effusion or pneumothorax.": absent findings named in one sentence.
        nouns = [FINDINGS[state[i].name].names[0] for i in absent]
        listed = ", ".join(nouns[:-1]) + (", or " if len(nouns) > 2 else " or ") + nouns[-1]
        sentences = [s for i, s in enumerate(sentences) if i not in absent] + [f"No {listed}."]
    order_rng.shuffle(sentences)
    return " ".join(sentences)


# ----------------------------------------------------------------------------------------------- sampling
def _random_finding(rng: random.Random, exclude=(), name: str | None = None) -> Statement:
    """A present finding (of kind `name`, else a random kind not in `exclude`) with random attributes."""
    name = name or rng.choice([name for name in FINDINGS if name not in exclude])
    finding = FINDINGS[name]
    side = location = grade = measure = None
    if finding.located:
        location = rng.choice(list(LOCATIONS))
        side = LOCATIONS[location][0]
    elif finding.sided:
        side = rng.choice(("left", "right", "right", "left", "bilateral"))
    if finding.scale == "size":
        grade = rng.choice((None, "small", "moderate", "large"))
    elif finding.scale == "degree":
        grade = rng.choice((None, "mild", "moderate", "severe"))
    elif finding.scale == "measure":
        measure = float(rng.choice((4, 5, 6, 8, 9, 12, 15, 18, 22, 25)))
    change = rng.choice((None, None, None, "new", "unchanged", "increased", "decreased", "persistent", "resolved"))
    if change in ("increased", "decreased", "resolved"):
        grade = None  # "increased small effusion" is not how reports are written
    return Statement("finding", name, True, side, location, grade, measure, change)


def _random_device(rng: random.Random, exclude=()) -> Statement:
    name = rng.choice([name for name in DEVICES if name not in exclude])
    device = DEVICES[name]
    side = rng.choice(("left", "right")) if device.sided else None
    tip = rng.choice(device.tips) if device.tips else None
    change = rng.choice((None, None, "new", "unchanged"))
    return Statement("device", name, True, side=side, tip=tip, change=change)


def sample_state(rng: random.Random) -> list[Statement]:
    """A random clinical state: some present findings and devices, some absent findings, normal boilerplate."""
    state: list[Statement] = []
    kind = rng.random()
    num_findings = 0 if kind < 0.25 else rng.choice((1, 1, 1, 2, 2, 3))
    used: set[str] = set()
    for _ in range(num_findings):
        statement = _random_finding(rng, exclude=used)
        used.add(statement.name)
        state.append(statement)
    if rng.random() < 0.45:
        state.append(_random_device(rng))
    commonly_absent = [
        "effusion",
        "pneumothorax",
        "consolidation",
        "edema",
        "cardiomegaly",
        "infiltrate",
        "mass",
        "hilar",
    ]
    for name in rng.sample(commonly_absent, rng.randint(1, 3)):
        if name not in used:
            used.add(name)
            state.append(Statement("finding", name, present=False))
    present = {s.name for s in state if s.kind == "finding" and s.present}
    contradicted = {"lungs_clear": any(FINDINGS[name].located for name in present),
                    "vasculature": bool(present & {"congestion", "edema"})}
    for name in rng.sample(list(NORMAL_STATEMENTS), rng.randint(0, 3)):
        if not contradicted.get(name):
            state.append(Statement("normal", name))
    return state


def _mutations(statement: Statement, rng: random.Random, lungs_clear: bool) -> list[tuple[str, Statement]]:
    """(category, changed statement) for every single clinical change of `statement` (`lungs_clear`: the
    state says so, which a new lung finding would contradict)."""
    out = []
    if statement.kind == "finding":
        finding = FINDINGS[statement.name]
        if statement.present:
            out.append(("negation", Statement("finding", statement.name, present=False)))
            if statement.location in MIRROR:
                location = MIRROR[statement.location]
                out.append(("laterality", replace(statement, location=location, side=LOCATIONS[location][0])))
            elif finding.sided and statement.side in ("left", "right"):
                other = "left" if statement.side == "right" else "right"
                out.append(("laterality", replace(statement, side=other)))
            elif finding.sided and statement.side == "bilateral":
                out.append(("laterality", replace(statement, side=rng.choice(("left", "right")))))
            if statement.grade in ("small", "mild"):
                out.append(
                    ("severity_size", replace(statement, grade="large" if finding.scale == "size" else "severe"))
                )
            elif statement.grade in ("large", "severe", "moderate"):
                out.append(("severity_size", replace(statement, grade="small" if finding.scale == "size" else "mild")))
            if statement.measure_mm is not None:
                factor = 3.0 if statement.measure_mm < 12 else 1 / 3
                out.append(
                    ("severity_size", replace(statement, measure_mm=float(round(statement.measure_mm * factor))))
                )
            if statement.change in OPPOSITE_CHANGE:
                out.append(("change_over_time", replace(statement, change=OPPOSITE_CHANGE[statement.change])))
        else:
            present = _random_finding(rng, name=statement.name)
            if not (lungs_clear and finding.located):
                out.append(("negation", present))
    elif statement.kind == "device":
        device = DEVICES[statement.name]
        if device.tips and statement.tip is not None:
            other = [tip for tip in device.tips if tip != statement.tip]
            out.append(("devices_lines", replace(statement, tip=rng.choice(other))))
        if statement.side is not None:
            out.append(("laterality", replace(statement, side="left" if statement.side == "right" else "right")))
        if statement.change in DEVICE_CHANGE_WORDS:
            other_change = "unchanged" if statement.change == "new" else "new"
            out.append(("change_over_time", replace(statement, change=other_change)))
        if not device.tips:
            out.append(("devices_lines", replace(statement, removed=True, change=None)))
    return out


def make_triplet(rng: random.Random) -> dict | None:
    """One {"anchor", "positive", "negative", "positive_kind", "negative_kind"} triplet, or None."""
    state = sample_state(rng)
    lungs_clear = any(s.kind == "normal" and s.name == "lungs_clear" for s in state)
    candidates = [
        (i, category, changed) for i, s in enumerate(state) for category, changed in _mutations(s, rng, lungs_clear)
    ]
    if not state or not candidates:
        return None
    index, category, changed = rng.choice(candidates)
    if all(not s.present or s.kind == "normal" for s in state) and category == "negation":
        category = "normal_to_abnormal"
    mutated = state[:index] + [changed] + state[index + 1 :]
    anchor_style, positive_style = rng.randrange(10**9), rng.randrange(10**9)
    anchor_order = rng.randrange(10**9)
    summarize = rng.random() < 0.3
    anchor = realize(state, anchor_style, anchor_order)
    positive = realize(state, positive_style, rng.randrange(10**9), summarize_normal=summarize)
    negative = realize(mutated, anchor_style, anchor_order)
    if len({anchor, positive, negative}) < 3:
        return None
    return {"anchor": anchor, "positive": positive, "negative": negative,
            "positive_kind": FAMILY, "negative_kind": f"{FAMILY}:{category}"}


def build_synthetic_triplets(count: int, seed: int = 0) -> list[dict]:
    """`count` distinct synthetic triplets, drawn from `random.Random(seed)`."""
    if count < 0:
        raise ValueError(f"`count` must be non-negative, got {count}.")
    rng = random.Random(seed)
    triplets, seen = [], set()
    attempts = 0
    while len(triplets) < count:
        attempts += 1
        if attempts > 20 * count + 100:
            raise RuntimeError(f"Could only make {len(triplets)} distinct synthetic triplets of {count}.")
        triplet = make_triplet(rng)
        if triplet is not None and (triplet["anchor"], triplet["negative"]) not in seen:
            seen.add((triplet["anchor"], triplet["negative"]))
            triplets.append(triplet)
    return triplets


__all__ = ["FAMILY", "Statement", "build_synthetic_triplets", "make_triplet", "realize", "sample_state"]
