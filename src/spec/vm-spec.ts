/**
 * VmSpec: what the guest sees (pinned machine type, RAM, CPU, devices, direct-boot kernel) and
 * the host-side parts that may change on a resume (drive files, port forwards, the RAM backing
 * file, the stream to load). Pure data and checks: the base library stores it, instances record
 * it, src/vm turns it into a QEMU command line.
 *
 * Why these choices: a snapshot only resumes on an identical virtual machine, so the spec pins
 * everything that changes guest-visible state (machine version, CPU model, NIC option ROM) and
 * keeps the host-only parts (port forwards, file paths, sockets) separate and free to change.
 */
import { UsageError } from '../util/errors.js';
import { checkRuntimeSpec } from './validate.js';

export interface DriveSpec {
  file: string;
  format: 'raw' | 'qcow2';
  /** Bus as in QEMU's -drive if=; the guest sees a different device for each. */
  if: 'virtio' | 'ide' | 'none';
  id?: string;
  readOnly?: boolean;
  /** QEMU's cache mode; default QEMU's own (writeback). */
  cache?: 'writeback' | 'none' | 'writethrough' | 'directsync' | 'unsafe';
  /**
   * What QEMU does with the guest's discards (TRIM): `unmap` passes them to the image (a qcow2
   * cluster over a backing file becomes a zero cluster), `ignore` (QEMU's default) drops them.
   * Host-side only: virtio-blk offers discard to the guest either way (a device property on by
   * default since machine type 4.0), so a snapshot resumes on a drive with or without it.
   */
  discard?: 'unmap' | 'ignore';
  /** Guest writes of zeroes: `unmap` turns them into discards (needs discard unmap). Host-side only. */
  detectZeroes?: 'off' | 'on' | 'unmap';
  /**
   * A qcow2 drive opened over this backing node instead of the backing file its header names
   * (a synthesized VM starts over the base disk and is switched to its rebuilt layer before it
   * runs). Host-side only; the guest sees the drive's bytes.
   */
  backing?: DriveBacking;
}

/** A drive's backing node: an image file, or an NBD export served over a unix socket. */
export type DriveBacking =
  { kind: 'image'; file: string; format: 'raw' | 'qcow2' } | { kind: 'nbd'; socket: string; export: string };

/** Where a resuming QEMU reads its memory snapshot from. */
export type IncomingSpec =
  /** A migration stream in a file, loaded before the VM runs. */
  | { from: 'file'; path: string }
  /** A unix socket QEMU listens on; the caller streams into it, then continues the VM. */
  | { from: 'unix'; path: string }
  /** A FIFO QEMU reads (through cat); the caller writes into it, then continues the VM. */
  | { from: 'fifo'; path: string };

/** A host-side TCP forward of user-mode networking; not guest state, may differ on resume. */
export interface PortForward {
  /** Default 127.0.0.1. */
  hostAddr?: string;
  hostPort: number;
  guestPort: number;
}

/** One user-mode NIC. The model and its option ROM are guest-visible: keep them on resume. */
export interface NetworkSpec {
  /** Default virtio-net-pci. */
  model?: string;
  /** NIC option ROM; '' (the default) means none: nothing to match on resume, faster boot. */
  romfile?: string;
  mac?: string;
  forwards: PortForward[];
}

/** Guest RAM backed by a file (memory-backend-file, id pc.ram). */
export interface MemoryBackendFile {
  path: string;
  /** share=on writes through to the file; off maps it private copy-on-write. */
  share: boolean;
}

export interface VmSpec {
  /** Pinned machine type, e.g. 'pc-q35-7.2' (never a bare alias like 'q35'). */
  machine: string;
  memoryMiB: number;
  /** CPU model; default 'qemu64' (the same under TCG and KVM). */
  cpu?: string;
  /** vCPUs; default 1. */
  smp?: number;
  kernel?: string;
  initrd?: string;
  append?: string;
  drives?: DriveSpec[];
  network?: NetworkSpec;
  memoryBackendFile?: MemoryBackendFile;
  /**
   * A QEMU guest agent channel: a virtio-serial controller with one port named
   * org.qemu.guest_agent.0 (after the drives and the NIC), its host end a socket in the run
   * directory. Guest-visible (a PCI device): it must be in the base VM from its boot, and every
   * resume of it keeps it. The guest runs qemu-ga on it (or nothing: then nothing answers).
   */
  guestAgent?: boolean;
  /** Resume from this migration stream instead of booting. */
  incoming?: IncomingSpec;
  /** Exit instead of rebooting (a guest panic then ends QEMU, visibly). Default true. */
  noReboot?: boolean;
  name?: string;
  /** Never run: raw QEMU options come from the host's command line (--qemu-arg), see validate.ts. */
  extraArgs?: string[];
}

export const DEFAULT_CPU = 'qemu64';

/** Checks a spec before QEMU sees it; throws UsageError with the offending field. */
export function validateSpec(spec: VmSpec): void {
  if (!/^[a-z0-9][a-z0-9.-]*-\d+\.\d+$/.test(spec.machine)) {
    throw new UsageError(`machine type '${spec.machine}' must be a pinned version like pc-q35-7.2`, {
      field: 'machine',
    });
  }
  if (!Number.isInteger(spec.memoryMiB) || spec.memoryMiB < 16) {
    throw new UsageError(`memoryMiB must be an integer ≥ 16, got ${spec.memoryMiB}`, { field: 'memoryMiB' });
  }
  if (spec.smp !== undefined && (!Number.isInteger(spec.smp) || spec.smp < 1)) {
    throw new UsageError(`smp must be a positive integer, got ${spec.smp}`, { field: 'smp' });
  }
  for (const d of spec.drives ?? []) {
    if (d.detectZeroes === 'unmap' && d.discard !== 'unmap') {
      throw new UsageError('detect-zeroes=unmap needs discard=unmap on the same drive', { field: 'drives' });
    }
  }
  if ((spec.initrd !== undefined || spec.append !== undefined) && spec.kernel === undefined) {
    throw new UsageError('initrd/append need a kernel', { field: 'kernel' });
  }
  for (const f of spec.network?.forwards ?? []) {
    for (const port of [f.hostPort, f.guestPort]) {
      if (!Number.isInteger(port) || port < 1 || port > 65535) {
        throw new UsageError(`invalid port ${port} in a port forward`, { field: 'network.forwards' });
      }
    }
  }
  checkRuntimeSpec(spec); // the closed list: values that reach argv (spec/validate.ts)
}

/**
 * The spec to resume a snapshot of `spec` elsewhere: the same guest-visible machine, with new
 * host-side parts (drive files in order, port forwards) and the memory snapshot to load.
 */
export function resumeSpec(
  spec: VmSpec,
  changes: { incoming: IncomingSpec; driveFiles?: string[]; forwards?: PortForward[] },
): VmSpec {
  const drives = spec.drives?.map((d, i) => ({ ...d, file: changes.driveFiles?.[i] ?? d.file }));
  if (changes.driveFiles && changes.driveFiles.length !== (spec.drives?.length ?? 0)) {
    throw new UsageError(
      `the snapshot has ${spec.drives?.length ?? 0} drive(s) but ${changes.driveFiles.length} file(s) were given`,
    );
  }
  const out: VmSpec = { ...spec, incoming: changes.incoming };
  if (drives) out.drives = drives;
  if (spec.network) out.network = { ...spec.network, forwards: changes.forwards ?? spec.network.forwards };
  return out;
}
