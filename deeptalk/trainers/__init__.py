"""DeepTalk training: one Trainer per phase, plus the modality expert assignment step.

    phase 1  DeepTalkAlignmentTrainer   (alignment.py)   adapter + audio rows
    assign   deeptalk.trainers.assignment               modality load -> speech experts
    phase 2  DeepTalkExpertsTrainer     (experts.py)     one bank, routing speech_only / text_only
    phase 3  DeepTalkJointTrainer       (joint.py)       everything but Whisper/adapter, free routing
    phase 4  DeepTalkSpeechDPOTrainer   (dpo.py)         per-stream DPO on spoken answers

What trains in each phase is in freezing.py.
"""

from .alignment import DeepTalkAlignmentConfig, DeepTalkAlignmentTrainer
from .dpo import DeepTalkSpeechDPOConfig, DeepTalkSpeechDPOTrainer
from .experts import DeepTalkExpertsConfig, DeepTalkExpertsTrainer
from .freezing import PhasePlan, apply_phase, plan_for_phase

__all__ = [
    "DeepTalkAlignmentConfig",
    "DeepTalkAlignmentTrainer",
    "DeepTalkExpertsConfig",
    "DeepTalkSpeechDPOConfig",
    "DeepTalkSpeechDPOTrainer",
    "DeepTalkExpertsTrainer",
    "PhasePlan",
    "apply_phase",
    "plan_for_phase",
]
