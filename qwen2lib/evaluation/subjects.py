"""Subject tables of C-Eval, CMMLU and MMLU and the category averages OpenCompass reports for each.

The names, Chinese subject names and groupings are those of OpenCompass's dataset configs and summary
groups (``configs/summarizers/groups/{ceval,cmmlu,mmlu}.py``); a category's score is the plain mean of
its subjects' accuracies, as OpenCompass's summarizer averages them.
"""
from __future__ import annotations

from typing import Mapping

# C-Eval: subject -> Chinese name (used in the exam prompt), grouped by category.
CEVAL_CATEGORIES = {
    "STEM": {
        "computer_network": "计算机网络", "operating_system": "操作系统", "computer_architecture": "计算机组成",
        "college_programming": "大学编程", "college_physics": "大学物理", "college_chemistry": "大学化学",
        "advanced_mathematics": "高等数学", "probability_and_statistics": "概率统计",
        "discrete_mathematics": "离散数学", "electrical_engineer": "注册电气工程师", "metrology_engineer": "注册计量师",
        "high_school_mathematics": "高中数学", "high_school_physics": "高中物理", "high_school_chemistry": "高中化学",
        "high_school_biology": "高中生物", "middle_school_mathematics": "初中数学", "middle_school_biology": "初中生物",
        "middle_school_physics": "初中物理", "middle_school_chemistry": "初中化学", "veterinary_medicine": "兽医学",
    },
    "Social Science": {
        "college_economics": "大学经济学", "business_administration": "工商管理", "marxism": "马克思主义基本原理",
        "mao_zedong_thought": "毛泽东思想和中国特色社会主义理论体系概论", "education_science": "教育学",
        "teacher_qualification": "教师资格", "high_school_politics": "高中政治", "high_school_geography": "高中地理",
        "middle_school_politics": "初中政治", "middle_school_geography": "初中地理",
    },
    "Humanities": {
        "modern_chinese_history": "近代史纲要", "ideological_and_moral_cultivation": "思想道德修养与法律基础",
        "logic": "逻辑学", "law": "法学", "chinese_language_and_literature": "中国语言文学", "art_studies": "艺术学",
        "professional_tour_guide": "导游资格", "legal_professional": "法律职业资格", "high_school_chinese": "高中语文",
        "high_school_history": "高中历史", "middle_school_history": "初中历史",
    },
    "Other": {
        "civil_servant": "公务员", "sports_science": "体育学", "plant_protection": "植物保护",
        "basic_medicine": "基础医学", "clinical_medicine": "临床医学", "urban_and_rural_planner": "注册城乡规划师",
        "accountant": "注册会计师", "fire_engineer": "注册消防工程师",
        "environmental_impact_assessment_engineer": "环境影响评价工程师", "tax_accountant": "税务师",
        "physician": "医师资格",
    },
}
CEVAL_SUBJECTS = {s: zh for group in CEVAL_CATEGORIES.values() for s, zh in group.items()}
CEVAL_HARD = ("advanced_mathematics", "discrete_mathematics", "probability_and_statistics", "college_chemistry",
              "college_physics", "high_school_mathematics", "high_school_chemistry", "high_school_physics")

# MMLU: the four groups of OpenCompass's mmlu summary (subject names are also the prompt's, "_" -> " ").
MMLU_CATEGORIES = {
    "STEM": ("abstract_algebra", "anatomy", "astronomy", "college_biology", "college_chemistry",
             "college_computer_science", "college_mathematics", "college_physics", "computer_security",
             "conceptual_physics", "electrical_engineering", "elementary_mathematics", "high_school_biology",
             "high_school_chemistry", "high_school_computer_science", "high_school_mathematics",
             "high_school_physics", "high_school_statistics", "machine_learning"),
    "Humanities": ("formal_logic", "high_school_european_history", "high_school_us_history",
                   "high_school_world_history", "international_law", "jurisprudence", "logical_fallacies",
                   "moral_disputes", "moral_scenarios", "philosophy", "prehistory", "professional_law",
                   "world_religions"),
    "Social Science": ("econometrics", "high_school_geography", "high_school_government_and_politics",
                       "high_school_macroeconomics", "high_school_microeconomics", "high_school_psychology",
                       "human_sexuality", "professional_psychology", "public_relations", "security_studies",
                       "sociology", "us_foreign_policy"),
    "Other": ("business_ethics", "clinical_knowledge", "college_medicine", "global_facts", "human_aging",
              "management", "marketing", "medical_genetics", "miscellaneous", "nutrition",
              "professional_accounting", "professional_medicine", "virology"),
}
MMLU_SUBJECTS = tuple(sorted(s for group in MMLU_CATEGORIES.values() for s in group))

# CMMLU: subject -> (Chinese name, its subcategories); categories are unions of subcategories, and a
# subject may sit in two ("China specific" overlaps the others).
CMMLU_SUBJECTS = {
    "agronomy": ("农学", ("other",)), "anatomy": ("解剖学", ("biology",)),
    "ancient_chinese": ("古汉语", ("linguistics", "china specific")), "arts": ("艺术学", ("arts",)),
    "astronomy": ("天文学", ("physics",)), "business_ethics": ("商业伦理", ("business",)),
    "chinese_civil_service_exam": ("中国公务员考试", ("politics", "china specific")),
    "chinese_driving_rule": ("中国驾驶规则", ("other", "china specific")),
    "chinese_food_culture": ("中国饮食文化", ("culture", "china specific")),
    "chinese_foreign_policy": ("中国外交政策", ("politics", "china specific")),
    "chinese_history": ("中国历史", ("history", "china specific")),
    "chinese_literature": ("中国文学", ("literature", "china specific")),
    "chinese_teacher_qualification": ("中国教师资格", ("education", "china specific")),
    "clinical_knowledge": ("临床知识", ("other",)), "college_actuarial_science": ("大学精算学", ("math",)),
    "college_education": ("大学教育学", ("education",)),
    "college_engineering_hydrology": ("大学工程水文学", ("engineering",)), "college_law": ("大学法律", ("law",)),
    "college_mathematics": ("大学数学", ("math",)), "college_medical_statistics": ("大学医学统计", ("statistics",)),
    "college_medicine": ("大学医学", ("other",)), "computer_science": ("计算机科学", ("computer science",)),
    "computer_security": ("计算机安全", ("other",)), "conceptual_physics": ("概念物理学", ("physics",)),
    "construction_project_management": ("建设工程管理", ("other", "china specific")),
    "economics": ("经济学", ("economics",)), "education": ("教育学", ("education",)),
    "electrical_engineering": ("电气工程", ("engineering",)),
    "elementary_chinese": ("小学语文", ("linguistics", "china specific")),
    "elementary_commonsense": ("小学常识", ("other", "china specific")),
    "elementary_information_and_technology": ("小学信息技术", ("other",)),
    "elementary_mathematics": ("初等数学", ("math",)), "ethnology": ("民族学", ("culture", "china specific")),
    "food_science": ("食品科学", ("other",)), "genetics": ("遗传学", ("biology",)),
    "global_facts": ("全球事实", ("global",)), "high_school_biology": ("高中生物", ("biology",)),
    "high_school_chemistry": ("高中化学", ("chemistry",)), "high_school_geography": ("高中地理", ("geography",)),
    "high_school_mathematics": ("高中数学", ("math",)), "high_school_physics": ("高中物理学", ("physics",)),
    "high_school_politics": ("高中政治", ("politics", "china specific")),
    "human_sexuality": ("人类性行为", ("other",)), "international_law": ("国际法学", ("law",)),
    "journalism": ("新闻学", ("sociology",)), "jurisprudence": ("法理学", ("law",)),
    "legal_and_moral_basis": ("法律与道德基础", ("other",)), "logical": ("逻辑学", ("philosophy",)),
    "machine_learning": ("机器学习", ("computer science",)), "management": ("管理学", ("business",)),
    "marketing": ("市场营销", ("business",)), "marxist_theory": ("马克思主义理论", ("philosophy",)),
    "modern_chinese": ("现代汉语", ("linguistics", "china specific")), "nutrition": ("营养学", ("other",)),
    "philosophy": ("哲学", ("philosophy",)), "professional_accounting": ("专业会计", ("business",)),
    "professional_law": ("专业法学", ("law",)), "professional_medicine": ("专业医学", ("other",)),
    "professional_psychology": ("专业心理学", ("psychology",)), "public_relations": ("公共关系", ("politics",)),
    "security_study": ("安全研究", ("politics",)), "sociology": ("社会学", ("culture",)),
    "sports_science": ("体育学", ("other",)),
    "traditional_chinese_medicine": ("中医中药", ("other", "china specific")),
    "virology": ("病毒学", ("biology",)), "world_history": ("世界历史", ("history",)),
    "world_religions": ("世界宗教", ("global",)),
}
CMMLU_SUBCATEGORIES = {
    "STEM": ("physics", "chemistry", "biology", "computer science", "math", "engineering", "statistics"),
    "Humanities": ("history", "philosophy", "law", "arts", "literature", "global"),
    "Social Science": ("linguistics", "business", "politics", "culture", "economics", "geography", "psychology",
                       "education", "sociology"),
    "Other": ("other",),
    "China specific": ("china specific",),
}


def category_members(dataset: str) -> dict[str, tuple[str, ...]]:
    """Category -> its subjects, in the order OpenCompass reports them (the overall average is separate)."""
    if dataset == "ceval":
        return {**{c: tuple(s) for c, s in CEVAL_CATEGORIES.items()}, "Hard": CEVAL_HARD}
    if dataset == "mmlu":
        return dict(MMLU_CATEGORIES)
    if dataset == "cmmlu":
        return {c: tuple(s for s, (_, subs) in CMMLU_SUBJECTS.items() if set(subs) & set(subcats))
                for c, subcats in CMMLU_SUBCATEGORIES.items()}
    raise ValueError(f"dataset={dataset!r}: one of ceval, cmmlu, mmlu")


def known_subjects(dataset: str) -> tuple[str, ...]:
    return {"ceval": tuple(CEVAL_SUBJECTS), "cmmlu": tuple(CMMLU_SUBJECTS), "mmlu": MMLU_SUBJECTS}[dataset]


def prompt_name(dataset: str, subject: str) -> str:
    """How the prompt names a subject: Chinese for C-Eval and CMMLU, words for MMLU."""
    if dataset == "ceval":
        return CEVAL_SUBJECTS.get(subject, subject)
    if dataset == "cmmlu":
        return CMMLU_SUBJECTS[subject][0] if subject in CMMLU_SUBJECTS else subject
    return subject.replace("_", " ")


def category_scores(dataset: str, accuracy: Mapping[str, float]) -> dict[str, dict]:
    """{category: {"accuracy", "subjects" (scored), "of" (in the category)}} plus "Average" over every subject.

    A category none of whose subjects were scored is left out; one scored in part says so through
    ``subjects < of`` (a quick ``--subjects`` run is not comparable with a published number).
    """
    out = {}
    for category, members in category_members(dataset).items():
        scored = [accuracy[s] for s in members if s in accuracy]
        if scored:
            out[category] = {"accuracy": sum(scored) / len(scored), "subjects": len(scored), "of": len(members)}
    if accuracy:
        out["Average"] = {"accuracy": sum(accuracy.values()) / len(accuracy), "subjects": len(accuracy),
                          "of": len(set(known_subjects(dataset)) | set(accuracy))}
    return out
