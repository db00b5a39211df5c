/** Which launcher runs VMs here (vm/libvirt.ts decides), for layers above api/. */
export { libvirtReachable, libvirtUri, resolveLauncherKind } from '../vm/libvirt.js';
export type { LauncherChoice, LauncherKind } from '../vm/launcher.js';
