/**
 * Block-layer changes on a running (paused) QEMU: put another backing node under a drive that
 * was started with a backing override (DriveSpec.backing, named nodes from driveNodes()). A
 * synthesized VM starts over the base disk while its rebuilt disk layer is still being written;
 * once the layer is complete and proven it goes under the guest's own write layer, before the
 * VM ever runs — so the guest only ever sees the synthesized disk.
 */
import { driveNodes } from './argv.js';
import type { QemuVm } from './process.js';

/** blockdev-add `image` (a qcow2 whose own backing is the drive's current backing node), then reopen the drive on it. */
export async function swapBacking(vm: QemuVm, drive: number, image: { file: string; format: 'qcow2' }): Promise<void> {
  const n = driveNodes(drive);
  const node = `${n.top}-synth`;
  await vm.qmp.execute('blockdev-add', {
    driver: image.format,
    'node-name': node,
    'read-only': true,
    file: { driver: 'file', filename: image.file, 'read-only': true },
    backing: n.backing,
  });
  // blockdev-reopen takes the node's whole option set: what the drive was opened with, new backing.
  await vm.qmp.execute('blockdev-reopen', {
    options: [{ driver: 'qcow2', 'node-name': n.top, file: n.file, backing: node }],
  });
}
