namespace LoraMix.Torch;
public static class TorchProbe { public static string Version() => TorchSharp.torch.__version__; }
