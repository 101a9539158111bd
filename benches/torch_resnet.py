"""torchvision's ResNet-18 and ResNet-50 (v1.5: stride on the 3x3 of the bottleneck) in plain
PyTorch, for `torch_bench.py` on a machine that has torch but not torchvision. Same layers,
shapes and work as `torchvision.models.resnet18/50`; the bench uses torchvision's when it can.
"""
import torch.nn as nn
import torch.nn.functional as F


def conv_bn(cin, cout, k, stride=1):
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout)
    )


class Basic(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride):
        super().__init__()
        self.a = conv_bn(cin, planes, 3, stride)
        self.b = conv_bn(planes, planes, 3)
        self.down = conv_bn(cin, planes, 1, stride) if stride != 1 or cin != planes else None

    def forward(self, x):
        s = x if self.down is None else self.down(x)
        return F.relu(self.b(F.relu(self.a(x))) + s)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride):
        super().__init__()
        cout = planes * 4
        self.a = conv_bn(cin, planes, 1)
        self.b = conv_bn(planes, planes, 3, stride)
        self.c = conv_bn(planes, cout, 1)
        self.down = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x):
        s = x if self.down is None else self.down(x)
        return F.relu(self.c(F.relu(self.b(F.relu(self.a(x))))) + s)


class ResNet(nn.Module):
    def __init__(self, block, layers, classes=1000):
        super().__init__()
        self.stem = nn.Sequential(
            conv_bn(3, 64, 7, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
        )
        blocks, cin = [], 64
        for i, (n, planes) in enumerate(zip(layers, [64, 128, 256, 512])):
            for j in range(n):
                blocks.append(block(cin, planes, 2 if i > 0 and j == 0 else 1))
                cin = planes * block.expansion
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


def resnet18():
    return ResNet(Basic, [2, 2, 2, 2])


def resnet50():
    return ResNet(Bottleneck, [3, 4, 6, 3])
