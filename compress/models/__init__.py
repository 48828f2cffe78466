"""The model zoo: MobileNetV3 as data (block tables, torchvision's state_dict layout) and checkpoint loading."""
