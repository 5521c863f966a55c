"""Host programs of KVM selftests (``tools/testing/selftests/kvm/``), run by the VMM thread."""
