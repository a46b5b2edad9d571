System.Console.WriteLine(LoraMix.Torch.TorchProbe.Version());
